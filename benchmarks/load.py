"""Throughput under load: 1, 4, 16 clients generating at once on a 3-server swarm, and with 2 replicas per span.

    python benchmarks/load.py --model mid --clients 1 4 16 --plot load.png
    python benchmarks/load.py --model mid --layouts plain --batching on off --clients 1 16

Layouts: ``plain`` (--servers even spans, one server each) and ``replicas`` (the same spans, two servers
each); ``--batching off`` starts the servers with ``--no-batching`` (decode steps of concurrent sessions
one after another) to compare. The clients are threads of this process sharing one ``ShardedModel``, as a web server would,
each running a greedy ``generate`` of --new-tokens tokens (no EOS) from a prompt of its own. Every
prompt is first run once alone (also the warm-up); every concurrent output must equal that solo
output exactly.

One JSON line per (layout, clients): total tokens/s (all clients' new tokens / wall time from the
first start to the last finish), per-client tokens/s and time to first token, how the sessions spread
over the servers, how many decode steps ran batched with other sessions', and the speed-up over one
client.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import harness
import torch

from shardnet import ShardedModel
from shardnet.client.swarm_view import distinct_servers
from shardnet.dht import ServerState, ServerView
from shardnet.launch import LocalSwarm, even_spans
from shardnet.wire import pb

logger = logging.getLogger("benchmarks.load")
GREEDY = dict(do_sample=False, eos_token_id=None)  # no EOS: exactly max_new_tokens tokens
LAYOUTS = {"plain": 1, "replicas": 2}  # servers per span


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(parser)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument(
        "--batching",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="servers batch concurrent decode steps (on) or not (off); each value is a run",
    )
    parser.add_argument("--servers", type=int, default=3, help="spans the blocks are split into")
    parser.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens (seeded per client)")
    parser.add_argument("--new-tokens", type=int, default=32)
    return parser.parse_args()


@dataclass
class ClientRun:
    """One generate call."""

    started: float  # time.perf_counter() at the call
    first_token_at: float  # when its first new token came out
    finished: float  # when the call returned
    tokens: torch.Tensor  # [1, prompt + new]
    route: list[str]  # the servers it ran on, as server labels
    prompt_len: int  # tokens of the prompt, before the new ones

    @property
    def new_tokens(self) -> int:
        return self.tokens.shape[1] - self.prompt_len

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / (self.finished - self.started)


def online_servers(model: ShardedModel) -> dict[str, ServerView]:
    """'start:end@port' -> view of every online server, so replicas of one span stay apart."""
    views = distinct_servers(model.swarm.servers())
    return {
        f"{v.record.start}:{v.record.end}@{v.record.port}": v
        for v in sorted(views, key=lambda v: (v.record.start, v.record.port))
        if v.record.state == ServerState.ONLINE.value
    }


def server_counts(model: ShardedModel, labels: dict[str, str]) -> dict[str, pb.InfoResponse]:
    """Each server's own counters (its Info RPC: sessions opened, decode steps batched)."""
    return {
        label: model.transport.stub(address).Info(pb.InfoRequest(), timeout=10)
        for address, label in labels.items()
    }


def generate_one(
    model: ShardedModel, prompt: torch.Tensor, args: argparse.Namespace, labels: dict
) -> ClientRun:
    """One greedy generate in a session of its own; the session tells its route (``model.last_route``
    is the most recent call's route in any thread, so under concurrency it may be another client's)."""
    clock = harness.TokenClock()
    with model.inference_session(max_length=prompt.shape[1] + args.new_tokens) as conversation:
        tokens = model.generate(prompt, max_new_tokens=args.new_tokens, streamer=clock, **GREEDY)
        route = [labels.get(hop.server.address, hop.server.address) for hop in conversation.route]
    finished = time.perf_counter()
    made = tokens.shape[1] - prompt.shape[1]
    if made != args.new_tokens or len(clock.stamps) != args.new_tokens:
        raise RuntimeError(f"asked for {args.new_tokens} tokens, got {made} ({len(clock.stamps)} stamps)")
    return ClientRun(clock.started, clock.stamps[0], finished, tokens, route, prompt.shape[1])


def run_concurrently(
    model: ShardedModel, prompts: list[torch.Tensor], args: argparse.Namespace, labels: dict
) -> list[ClientRun]:
    """One thread per prompt, released together; re-raises the first client's error."""
    runs: list[ClientRun | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def client(index: int) -> None:
        try:
            barrier.wait()
            runs[index] = generate_one(model, prompts[index], args, labels)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    # Daemon threads: if the time limit fires, the main thread stops the swarm and exits without them.
    threads = [
        threading.Thread(target=client, args=(i,), name=f"client-{i}", daemon=True)
        for i in range(len(prompts))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(prompts)} clients failed") from errors[0]
    return runs


def load_fields(runs: list[ClientRun], solo: list[torch.Tensor]) -> dict:
    wall_s = max(r.finished for r in runs) - min(r.started for r in runs)
    new_tokens = sum(r.new_tokens for r in runs)
    ttft_s = [r.first_token_at - r.started for r in runs]
    matching = sum(torch.equal(r.tokens, expected) for r, expected in zip(runs, solo, strict=False))
    return {
        "total_tokens_per_s": round(new_tokens / wall_s, 3),
        "wall_s": round(wall_s, 3),
        "per_client_tokens_per_s_p50": round(harness.median([r.tokens_per_s for r in runs]), 3),
        "per_client_tokens_per_s_min": round(min(r.tokens_per_s for r in runs), 3),
        "ttft_ms_p50": harness.ms(harness.percentile(ttft_s, 50)),
        "ttft_ms_p95": harness.ms(harness.percentile(ttft_s, 95)),
        "outputs_match": matching == len(runs),
        "outputs_matching": matching,
    }


def session_spread(runs: list[ClientRun], labels: dict[str, str], before: dict, after: dict) -> dict:
    """Sessions per server during this run (the servers' own counters if they report them, else our
    routes), and the decode steps each server ran batched with other sessions' in that time."""
    served = {label: after[label].sessions_served - before[label].sessions_served for label in after}
    batched = {
        label: after[label].decode_steps_batched - before[label].decode_steps_batched for label in after
    }
    if any(served.values()):
        return {"sessions_per_server": served, "sessions_source": "info", "decode_steps_batched": batched}
    counted = Counter(label for run in runs for label in run.route)
    return {
        "sessions_per_server": {label: counted.get(label, 0) for label in labels.values()},
        "sessions_source": "routes",
        "decode_steps_batched": batched,
    }


def bench_layout(
    model_path: Path, layout: str, batching: str, prompts: list[torch.Tensor], args: argparse.Namespace
) -> list[dict]:
    blocks = harness.num_blocks(model_path)
    spans = even_spans(blocks, args.servers) * LAYOUTS[layout]
    swarm = LocalSwarm(
        model_path,
        spans,
        dtype=args.dtype,
        log_dir=harness.swarm_log_dir(args.log_dir, f"{layout}-batching-{batching}"),
        torch_threads=args.server_threads,
        extra_args=[] if batching == "on" else ["--no-batching"],
    )
    results = []
    try:
        began = time.perf_counter()
        swarm.start(timeout_s=600)
        logger.info("%s swarm %s up in %.1fs", layout, harness.span_names(spans), time.perf_counter() - began)
        model = ShardedModel.from_pretrained(
            model_path, initial_peers=swarm.initial_peers, dtype=harness.torch_dtype(args.dtype)
        )
        try:
            servers = online_servers(model)
            if len(servers) != len(spans):
                raise RuntimeError(f"{len(servers)} servers online in the DHT, {len(spans)} started")
            labels = {view.address: label for label, view in servers.items()}
            # Each server's startup probe, which routing weighs: on a busy machine, replicas of one span can
            # announce very different numbers and so get very different shares of the sessions.
            throughput = {label: round(view.record.throughput, 2) for label, view in servers.items()}
            solo_runs = [generate_one(model, prompt, args, labels) for prompt in prompts]  # also the warm-up
            solo = [run.tokens for run in solo_runs]
            logger.info("%s: %d solo runs done", layout, len(solo))
            first_total = None
            for clients in args.clients:
                before = server_counts(model, labels)
                runs = run_concurrently(model, prompts[:clients], args, labels)
                spread = session_spread(runs, labels, before, server_counts(model, labels))
                fields = load_fields(runs, solo[:clients])
                if clients == 1:
                    first_total = fields["total_tokens_per_s"]
                result = harness.record(
                    "load",
                    model=args.model,
                    dtype=args.dtype,
                    layout=layout,
                    batching=batching,
                    servers=len(spans),
                    spans=harness.span_names(spans),
                    replicas=LAYOUTS[layout],
                    clients=clients,
                    prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens,
                    **fields,
                    speedup_vs_1_client=round(fields["total_tokens_per_s"] / first_total, 3)
                    if first_total
                    else None,
                    **spread,
                    announced_throughput=throughput,
                    server_torch_threads=harness.threads_label(args.server_threads),
                )
                harness.emit(result)
                results.append(result)
        finally:
            model.close()
    finally:
        swarm.stop()
    return results


def plot(results: list[dict], path: Path) -> None:
    fig, (total, ttft) = harness.new_figure(2)
    runs = sorted({(r["layout"], r["batching"]) for r in results})
    for index, (layout, batching) in enumerate(runs):
        rows = [r for r in results if (r["layout"], r["batching"]) == (layout, batching)]
        clients, color = [r["clients"] for r in rows], f"C{index}"
        label = f"{layout} ({rows[0]['servers']} servers), batching {batching}"
        total.plot(clients, [r["total_tokens_per_s"] for r in rows], "o-", color=color, label=label)
        ttft.plot(clients, [r["ttft_ms_p50"] for r in rows], "o-", color=color, label=f"{label} p50")
        ttft.plot(clients, [r["ttft_ms_p95"] for r in rows], "x--", color=color, label=f"{label} p95")
    for axis, ylabel in ((total, "total new tokens/s"), (ttft, "time to first token, ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(
            sorted({r["clients"] for r in results}), [str(c) for c in sorted({r["clients"] for r in results})]
        )
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(ylabel)
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=8)
    r = results[0]
    harness.save_figure(
        fig, path, f"{r['model']} {r['dtype']} prompt {r['prompt_len']} new {r['new_tokens']}"
    )


def main() -> None:
    args = parse_args()
    harness.setup(args)
    model_path = harness.resolve_model(args.model)
    blocks = harness.num_blocks(model_path)
    if args.servers > blocks:
        raise SystemExit(f"--servers {args.servers}: the model has only {blocks} blocks")
    from shardnet.models import load_config

    vocab_size = load_config(model_path).vocab_size
    prompts = [
        harness.random_prompt(vocab_size, 1, args.prompt_len, seed=i) for i in range(max(args.clients))
    ]
    args.clients = sorted(set(args.clients))
    results = []
    with harness.time_limit(args.time_limit_s):
        for layout in args.layouts:
            for batching in args.batching:
                results += bench_layout(model_path, layout, batching, prompts, args)
    if args.plot and results:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
