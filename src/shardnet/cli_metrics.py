"""Metrics flags of ``shardnet serve``: where it exposes ``/metrics`` for Prometheus (server/metrics.py)."""

from __future__ import annotations

import argparse

from shardnet.cli_types import port_number


def add_metrics_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--metrics-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help="expose Prometheus metrics at http://--metrics-host:PORT/metrics (steps, tokens, queue/compute/"
        "push latency, batch size, sessions, cache, errors by status code, state); off by default; 0 = pick "
        "a free port (logged)",
    )
    serve.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="interface the metrics endpoint listens on (default 127.0.0.1: this machine only; 0.0.0.0 lets "
        "a Prometheus elsewhere scrape it, and anyone who can reach the port read the counts)",
    )
