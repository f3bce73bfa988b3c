"""Server memory: peak RSS against span length, and a 13B-shaped span in bfloat16.

    python benchmarks/memory.py spans --model mid --spans 0:1 0:2 0:4 0:8 0:16 --plot memory.png
    python benchmarks/memory.py 13b --blocks 0:4 --steps 16

``spans`` starts one server per span (one at a time) and reads its RSS and peak RSS (VmHWM) once it
is ONLINE, and the PSS of its whole process tree (server, DHT process, p2pd). ``13b`` writes (once, cached) a random checkpoint with Llama-2-13B shapes as sharded bf16
safetensors, serves one span of it, and reports load time, peak RSS and the span's decode step time.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import harness
import shaped_checkpoint
import torch

from shardnet.client.config import ClientConfig
from shardnet.client.planner import RoutePlanner
from shardnet.client.session import InferenceSession
from shardnet.client.swarm_view import SwarmView
from shardnet.client.transport import Transport
from shardnet.launch import LocalSwarm
from shardnet.models import Checkpoint
from shardnet.models.footprint import block_weight_bytes

logger = logging.getLogger("benchmarks.memory")
DISK_MARGIN_BYTES = 10 << 30  # leave this much free after writing the 13B-shaped checkpoint


def span(text: str) -> tuple[int, int]:
    start, _, end = text.partition(":")
    return int(start), int(end)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    spans = sub.add_parser("spans", help="peak RSS of one server per span")
    harness.add_common_args(spans, default_model="mid")
    spans.add_argument("--spans", type=span, nargs="+", default=[(0, 1), (0, 2), (0, 4), (0, 8), (0, 16)])
    big = sub.add_parser("13b", help="load time, peak RSS and decode step of a 13B-shaped bf16 span")
    harness.add_run_args(big)
    big.add_argument("--blocks", type=span, default=(0, 4), help="span to serve (default 0:4)")
    big.add_argument("--steps", type=int, default=16, help="timed single-token decode steps")
    big.add_argument(
        "--write",
        choices=["auto", "all", "needed"],
        default="auto",
        help="which shards to write: all, only the served span's, or all if the disk has room (default)",
    )
    return parser.parse_args()


@contextlib.contextmanager
def one_server(
    model_path: Path, span_: tuple[int, int], dtype: str, args
) -> Iterator[tuple[LocalSwarm, float]]:
    """A DHT plus one server; yields the swarm and seconds from process start to ONLINE."""
    swarm = LocalSwarm(
        model_path,
        [span_],
        dtype=dtype,
        log_dir=harness.swarm_log_dir(args.log_dir, f"span{span_[0]}-{span_[1]}"),
        torch_threads=args.server_threads,
        preloaded=False,  # a fresh interpreter, as a volunteer's `shardnet serve`: its own pages and start time
    )
    try:
        swarm.start_dht()
        began = time.perf_counter()
        swarm.start_server(*span_)
        swarm.wait_ready(timeout_s=900)
        yield swarm, time.perf_counter() - began
    finally:
        swarm.stop()


def span_weight_bytes(model_path: Path, span_: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes of the span's block weights once cast to ``dtype``, from the safetensors headers only
    (what a server's fit check counts)."""
    return sum(block_weight_bytes(Checkpoint(model_path), *span_, dtype))


def memory_fields(pid: int, weights: int) -> dict:
    peak = harness.peak_rss_bytes(pid)
    tree_pss, processes = harness.tree_pss_bytes(pid)
    return {
        "rss_mib": harness.mib(harness.rss_bytes(pid)),
        "peak_rss_mib": harness.mib(peak),
        "span_weights_mib": harness.mib(weights),
        "peak_minus_weights_mib": harness.mib(peak - weights),
        # the server with its DHT process and p2pd, as a volunteer's machine sees it
        "tree_pss_mib": harness.mib(tree_pss),
        "tree_pss_minus_weights_mib": harness.mib(tree_pss - weights),
        "tree_processes": processes,
    }


def run_spans(args: argparse.Namespace) -> None:
    model_path = harness.resolve_model(args.model)
    results = []
    for span_ in args.spans:
        weights = span_weight_bytes(model_path, span_, harness.torch_dtype(args.dtype))
        with one_server(model_path, span_, args.dtype, args) as (swarm, load_s):
            fields = memory_fields(swarm.servers[0].pid, weights)
        result = harness.record(
            "memory.spans",
            model=args.model,
            servers=1,
            spans=harness.span_names([span_]),
            dtype=args.dtype,
            blocks=span_[1] - span_[0],
            load_s=round(load_s, 2),
            **fields,
            server_torch_threads=harness.threads_label(args.server_threads),
        )
        harness.emit(result)
        results.append(result)
    if args.plot:
        fig, (axis,) = harness.new_figure(1, width_in=7.0)
        blocks = [r["blocks"] for r in results]
        for name in ("peak_rss_mib", "rss_mib", "span_weights_mib"):
            axis.plot(blocks, [r[name] for r in results], "o-", label=name.removesuffix("_mib"))
        axis.set_xlabel("blocks in the server's span")
        axis.set_ylabel("MiB")
        axis.set_ylim(bottom=0)
        axis.legend()
        harness.save_figure(fig, args.plot, f"server memory vs span: {args.model} {args.dtype}")


def decode_steps(swarm: LocalSwarm, span_: tuple[int, int], hidden_size: int, steps: int) -> list:
    """Time ``steps`` single-token steps of one hop; returns each step's StepTiming."""
    transport = Transport(64 << 20)
    view = SwarmView.connect(swarm.model_path, swarm.initial_peers, transport=transport)
    config = ClientConfig(dtype=torch.bfloat16, request_timeout_s=600)
    planner = RoutePlanner(view, view.health, config)
    timings = []
    try:
        with InferenceSession(
            planner, transport, view.health, swarm.model_id, span_, 1, steps + 1, config
        ) as session:
            generator = torch.Generator().manual_seed(0)
            for index in range(steps + 1):  # the first step is a warm-up
                hidden = torch.randn(1, 1, hidden_size, generator=generator).to(
                    torch.bfloat16
                )  # [batch, new, hidden]
                session.step(hidden, None, torch.tensor([[index]]))
                if index:
                    timings.append(session.last_timing)
    finally:
        view.close()
        transport.close()
    return timings


def run_13b(args: argparse.Namespace) -> None:
    folder = harness.CACHE_DIR / "bench-13b-shaped"
    shape = shaped_checkpoint.LLAMA_2_13B
    dtype = torch.bfloat16
    total = shaped_checkpoint.checkpoint_bytes(shape, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    missing = total - sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # headers are small
    free = shutil.disk_usage(folder).free
    write_all = args.write == "all" or (args.write == "auto" and free > missing + DISK_MARGIN_BYTES)
    logger.info(
        "13B-shaped checkpoint: %.1f GiB not yet written, %.1f GiB free; keeping %s shards",
        max(missing, 0) / (1 << 30),
        free / (1 << 30),
        "all" if write_all else "only the served span's",
    )
    began = time.perf_counter()
    blocks = None if write_all else range(*args.blocks)
    on_disk = shaped_checkpoint.write_shaped_checkpoint(folder, shape, dtype, blocks)
    write_s = time.perf_counter() - began
    weights = span_weight_bytes(folder, args.blocks, dtype)
    with one_server(folder, args.blocks, "bfloat16", args) as (swarm, load_s):
        pid = swarm.servers[0].pid
        loaded = memory_fields(pid, weights)
        timings = decode_steps(swarm, args.blocks, shape["hidden_size"], args.steps)
        peak_after_decode = harness.peak_rss_bytes(pid)
    totals = [t.step_s for t in timings]
    compute = [t.hops[0].compute_s for t in timings]
    network = [t.hops[0].network_s + t.hops[0].return_s for t in timings]  # there and back
    result = harness.record(
        "memory.13b_shaped",
        model="llama-2-13b-shaped-random",
        servers=1,
        spans=harness.span_names([args.blocks]),
        dtype="bfloat16",
        batch=1,
        blocks=args.blocks[1] - args.blocks[0],
        load_s=round(load_s, 2),
        **loaded,
        peak_rss_after_decode_mib=harness.mib(peak_after_decode),
        steps=len(timings),
        step_ms_p50=harness.ms(harness.median(totals)),
        step_ms_p95=harness.ms(harness.percentile(totals, 95)),
        server_compute_ms_p50=harness.ms(harness.median(compute)),
        network_ms_p50=harness.ms(harness.median(network)),
        checkpoint_shards_present=f"{on_disk['shards_present']}/{on_disk['shards_total']}",
        checkpoint_gib_on_disk=round(on_disk["bytes_present"] / (1 << 30), 2),
        checkpoint_gib_full=round(on_disk["total_bytes"] / (1 << 30), 2),
        checkpoint_write_s=round(write_s, 1),
        server_torch_threads=harness.threads_label(args.server_threads),
    )
    harness.emit(result)
    if args.plot:
        logger.info("13b: one result, nothing to plot")


def main() -> None:
    args = parse_args()
    harness.setup(args)
    with harness.time_limit(args.time_limit_s):
        run_spans(args) if args.command == "spans" else run_13b(args)


if __name__ == "__main__":
    main()
