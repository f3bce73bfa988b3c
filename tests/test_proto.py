"""The committed gRPC stubs are exactly what `make proto` generates from proto/."""

from __future__ import annotations

from pathlib import Path

from shardnet.wire import regen


def test_stubs_are_fresh(tmp_path):
    committed = Path(regen.DEFAULT_OUT)
    generated = regen.generate(tmp_path)
    assert generated, "protoc produced nothing"
    for path in generated:
        target = committed / path.name
        assert target.exists(), f"{target} is missing: run `make proto`"
        assert target.read_text() == path.read_text(), f"{target} is stale: run `make proto`"
