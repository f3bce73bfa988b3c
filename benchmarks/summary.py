"""Summarize hops.py results: swarm/local decode ratio and per-hop overhead per model, as a table and a plot.

    python benchmarks/summary.py benchmarks/results/latest/hops_*.jsonl --plot summary.png

Reads JSON lines written by hops.py (each file holds its own local baseline, measured in the same
run) and prints one markdown row per swarm layout; the README's Performance table is this output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import harness

NEW_PARTS = ("network_ms", "queue_ms", "compute_ms", "return_ms")  # hops.py's split (client/timings.py)
OLD_PARTS = ("client_ms", "wire_ms", "server_io_ms", "server_compute_ms")  # results before 2026-12-05


def load(paths: list[Path]) -> dict[str, list[dict]]:
    """Per model: the swarm lines of a hops.py run, each with ratio = swarm / local tokens per second."""
    by_model: dict[str, list[dict]] = {}
    for path in paths:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        local = next(line for line in lines if line["kind"] == "local")
        for line in lines:
            if line["kind"] == "swarm":
                line["ratio"] = line["tokens_per_s"] / local["tokens_per_s"]
                line["local_tokens_per_s"] = local["tokens_per_s"]
                by_model.setdefault(line["model"], []).append(line)
    return by_model


def table(by_model: dict[str, list[dict]]) -> str:
    first = next(
        (line["hop_split"][0] for lines in by_model.values() for line in lines if line.get("hop_split")), {}
    )
    keys = NEW_PARTS if "network_ms" in first else OLD_PARTS  # runs before step timings were split as now
    rows = [
        "| model | servers | swarm tok/s | local tok/s | ratio | per-hop overhead ms | "
        f"per hop: {' / '.join(key.removesuffix('_ms').replace('_', ' ') for key in keys)} ms | tokens match |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, lines in by_model.items():
        for line in lines:
            hops = line.get("hop_split", [])
            split = " / ".join(
                f"{sum(hop.get(key, 0.0) for hop in hops) / max(len(hops), 1):.2f}" for key in keys
            )
            rows.append(
                f"| {model} | {line['servers']} | {line['tokens_per_s']:.1f} | {line['local_tokens_per_s']:.1f} "
                f"| {line['ratio']:.2f} | {line['per_hop_overhead_ms']:.2f} | {split} | {line['tokens_match']} |"
            )
    return "\n".join(rows)


def plot(by_model: dict[str, list[dict]], path: Path) -> None:
    fig, (ratio, overhead) = harness.new_figure(2)
    for model, lines in by_model.items():
        servers = [line["servers"] for line in lines]
        ratio.plot(servers, [line["ratio"] for line in lines], "o-", label=model)
        overhead.plot(servers, [line["per_hop_overhead_ms"] for line in lines], "o-", label=model)
    ratio.axhline(1.0, color="grey", linestyle="--", label="local transformers")
    ratio.set_ylabel("decode tokens/s, swarm / local")
    ratio.set_ylim(0, 1.1)
    overhead.set_ylabel("per-hop overhead, ms per token")
    overhead.set_ylim(bottom=0)
    for axis in (ratio, overhead):
        axis.set_xlabel("servers (= hops)")
        axis.set_xticks(sorted({line["servers"] for lines in by_model.values() for line in lines}))
        axis.legend()
    harness.save_figure(fig, path, "shardnet swarm vs local transformers, greedy decode, 127.0.0.1")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", type=Path, nargs="+", help="hops.py JSON-lines files")
    parser.add_argument("--plot", type=Path, default=None, help="also draw ratio and per-hop overhead here")
    args = parser.parse_args()
    by_model = load(args.files)
    print(table(by_model))
    if args.plot:
        plot(by_model, args.plot)


if __name__ == "__main__":
    main()
