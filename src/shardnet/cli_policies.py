"""Policy flags: when a server rests (the headroom policy) and when it moves (rebalancing), for
``shardnet serve``; how much of the servers' work a client checks (``--verify-fraction``), for ``shardnet
api`` and ``shardnet chat``. Values are checked here one by one; how the server's fit together (on above
off, the file the others need) is checked by ``ServerConfig``, which says which flag is wrong."""

from __future__ import annotations

import argparse
from pathlib import Path

from shardnet.cli_types import float_where

_level = float_where(lambda v: 0 <= v <= 1, "a number in [0, 1]")
_positive = float_where(lambda v: v > 0, "a positive number of seconds")
_period = float_where(lambda v: v >= 0, "0 (never) or a positive number of seconds")


def add_policy_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--headroom-file",
        type=Path,
        metavar="FILE",
        default=None,
        help="rest when the owner needs the machine: FILE holds a number in [0, 1] that your own script "
        "keeps rewriting (power headroom, battery level, ...; the README has a battery example). Below "
        "--headroom-off (mean over --headroom-window) the server drains, frees its weights and caches and "
        "announces 'resting' (clients go elsewhere); above --headroom-on it loads again and serves. An "
        "unreadable file or a bad value is logged once and the last good value kept",
    )
    serve.add_argument(
        "--headroom-on",
        type=_level,
        default=None,
        metavar="X",
        help="serve again when the mean headroom rises above X (default 0.5; needs --headroom-file)",
    )
    serve.add_argument(
        "--headroom-off",
        type=_level,
        default=None,
        metavar="Y",
        help="rest when the mean headroom falls below Y, less than --headroom-on; in between nothing "
        "changes (default 0.2; needs --headroom-file)",
    )
    serve.add_argument(
        "--headroom-window",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="average the headroom over this many seconds (default 60; needs --headroom-file)",
    )
    serve.add_argument(
        "--rebalance-period",
        type=_period,
        default=60.0,
        metavar="SECONDS",
        help="with --num-blocks: about this often (+-20%%) check whether moving would lift the swarm's "
        "weakest blocks by enough (its slowest block 4/3 as fast or more); if so, and still so after a "
        "random wait, drain, hand sessions over and serve the new blocks (default 60; 0 = never move; "
        "--blocks servers never move)",
    )


def add_verify_flag(parser: argparse.ArgumentParser) -> None:
    """A client command's ``--verify-fraction`` (``ShardedModel.from_pretrained(verify_fraction=)``)."""
    parser.add_argument(
        "--verify-fraction",
        type=_level,
        default=0.05,
        help="probability that each hop's step is computed again by another holder of its blocks; a server "
        "outvoted by two others is not used again and its steps are recomputed (1 = every step, every "
        "output exact even with a server computing wrong; 0 = never; default 0.05)",
    )
