"""``shardnet eval``'s flags: lm-evaluation-harness's own names (``--tasks``, ``--include-path``,
``--limit``, ``--batch-size``, ``--output-path``), plus the swarm's (``--initial-peers``, ``--swarm-key-file``,
``--dtype``, ``--verify-fraction``, added by ``cli_flags``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from shardnet.cli_types import positive_int


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, type=Path, help="model folder with its tokenizer (the client's parts)"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        metavar="TASK",
        help="lm-eval task or group names (e.g. shardnet_facts with --include-path benchmarks/eval)",
    )
    parser.add_argument(
        "--include-path",
        type=Path,
        default=None,
        metavar="DIR",
        help="a folder of lm-eval task YAML files, besides lm-eval's catalogue (whose data sets need the hub)",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="at most this many documents per task"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=1, help="requests per forward pass (default 1)"
    )
    parser.add_argument(
        "--output-path",
        type=Path,
        required=True,
        metavar="OUT",
        help="where lm-eval's results go, as JSON: a file, or a folder (results.json in it)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
