"""Regenerate the Python gRPC stubs from proto/: ``python -m shardnet.wire.regen [--out DIR]``.

The stubs are committed under ``src/shardnet/wire/v1``; ``tests/test_proto.py`` fails if they are stale.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = PROTO_ROOT / "shardnet" / "v1" / "shardnet.proto"
DEFAULT_OUT = Path(__file__).resolve().parent / "v1"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and rewrite the generated import so the stubs live in ``shardnet.wire.v1``."""
    from grpc_tools import protoc  # dev dependency; imported here so the package never needs it at run time

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + str(PROTO_FILE))
        written = []
        for src in sorted((Path(tmp) / "shardnet" / "v1").glob("shardnet_pb2*")):
            text = src.read_text()
            text = re.sub(r"^from shardnet\.v1 import", "from shardnet.wire.v1 import", text, flags=re.M)
            target = out_dir / src.name
            target.write_text(text)
            written.append(target)
    (out_dir / "__init__.py").write_text(
        '"""Generated gRPC stubs for shardnet.v1 (python -m shardnet.wire.regen)."""\n'
    )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the stubs")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
