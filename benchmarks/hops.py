"""Decode speed vs number of hops: local transformers generate, then the swarm with 1, 2, 3, 6 servers.

    python benchmarks/hops.py --model smollm2 --servers 1 2 3 6 --plot hops.png

Prints one JSON line for local transformers and one per swarm layout (tokens/s of the decode phase,
time to first token, inter-token latency p50/p95, per-hop overhead, and the per-hop split of a decode
step along its critical path: network into the hop, the server's queue and compute, the return to the
client, as ``session.step_timings`` has them (client/timings.py); ``critical_path_vs_step`` is their sum
over the step's measured time, 1.0 when they account for all of it). Greedy, no EOS, so every run makes exactly
--new-tokens tokens; the swarm line says whether its tokens equal the local ones, its speed against
local (``speed_vs_local``), a bare gRPC round trip to one of its servers (``bare_grpc_rtt_ms``, an Info
call) and the per-hop budget: what a decode step costs beyond its servers' compute, per hop, less that
round trip (``per_hop_beyond_compute_and_rtt_ms``: the chain's time, from sending the step to reading
the last reply, less the servers' compute, per hop, less the round trip; the client's head and
``generate``'s own work are outside it, in ``outside_hops_ms``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import harness
import torch

from shardnet import ShardedModel
from shardnet.launch import LocalSwarm, even_spans

logger = logging.getLogger("benchmarks.hops")
GREEDY = dict(do_sample=False, eos_token_id=None)  # no EOS: exactly max_new_tokens tokens


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(parser)
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2, 3, 6], help="swarm sizes to try")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens (seeded)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per layout; medians reported")
    parser.add_argument(
        "--push", nargs="+", choices=["on", "off"], default=["on"], help="server-to-server push (default on)"
    )
    return parser.parse_args()


def timed_runs(generate, prompt: torch.Tensor, args: argparse.Namespace) -> tuple[list[dict], torch.Tensor]:
    """A short warm-up, then --repeats timed generates; returns per-run summaries and the last tokens."""
    generate(prompt, min(args.new_tokens, 4), None)
    runs, tokens = [], None
    for _ in range(args.repeats):
        clock = harness.TokenClock()
        tokens = generate(prompt, args.new_tokens, clock)
        made = tokens.shape[1] - prompt.shape[1]
        if made != args.new_tokens or len(clock.stamps) != args.new_tokens:
            raise RuntimeError(f"asked for {args.new_tokens} tokens, got {made} ({len(clock.stamps)} stamps)")
        runs.append(clock.summary())
    return runs, tokens


def speed_fields(runs: list[dict], batch: int) -> dict:
    """Medians over repeats of each run's own figures."""
    step_s = harness.median([r["decode_step_s"] for r in runs])
    return {
        "tokens_per_s": round(batch / step_s, 3),
        "decode_step_ms": harness.ms(step_s),
        "ttft_ms": harness.ms(harness.median([r["ttft_s"] for r in runs])),
        "itl_p50_ms": harness.ms(harness.median([harness.percentile(r["gaps_s"], 50) for r in runs])),
        "itl_p95_ms": harness.ms(harness.median([harness.percentile(r["gaps_s"], 95) for r in runs])),
    }


def bench_local(
    model_path: Path, prompt: torch.Tensor, args: argparse.Namespace
) -> tuple[dict, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=harness.torch_dtype(args.dtype)).eval()

    def generate(ids, new_tokens, streamer):
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=new_tokens, streamer=streamer, use_cache=True, **GREEDY)

    runs, tokens = timed_runs(generate, prompt, args)
    fields = dict(servers=0, spans=[], hops=0, **speed_fields(runs, args.batch))
    return fields, tokens


HOP_PARTS = ("network_s", "queue_s", "compute_s", "return_s")  # client/timings.py: they add up to the step


def hop_split(steps: list, spans: list[str]) -> list[dict]:
    """Mean per hop over decode steps (``StepTiming``s, none pending), in ms: the network into the hop,
    the server's queue and compute, and the return to the client where the client waits on this hop."""
    split = []
    for index, span in enumerate(spans):
        hops = [step.hops[index] for step in steps]

        def mean_ms(name: str, hops: list = hops) -> float:
            return harness.ms(sum(getattr(hop, name) for hop in hops) / len(hops))

        split.append(
            {"span": span, **{name.replace("_s", "_ms"): mean_ms(name) for name in HOP_PARTS}}
            | {"total_ms": mean_ms("total_s")}
        )
    return split


def step_fields(steps: list) -> dict:
    """The decode steps' measured time against their hops' parts added up (the critical path)."""
    step_ms = harness.ms(harness.median([step.step_s for step in steps]))
    path_ms = harness.ms(harness.median([step.critical_path_s for step in steps]))
    return {
        "step_ms": step_ms,
        "critical_path_ms": path_ms,
        "critical_path_vs_step": round(path_ms / step_ms, 3),
    }


def bench_swarm(
    model_path: Path, spans: list[tuple[int, int]], prompt: torch.Tensor, args: argparse.Namespace
) -> list[tuple[dict, torch.Tensor]]:
    """One swarm; a client per --push mode on it, in turn. Returns (fields, tokens) per mode."""
    swarm = LocalSwarm(
        model_path,
        spans,
        dtype=args.dtype,
        log_dir=harness.swarm_log_dir(args.log_dir, f"servers{len(spans)}"),
        torch_threads=args.server_threads,
    )
    try:
        began = time.perf_counter()
        swarm.start(timeout_s=600)
        logger.info("swarm %s up in %.1fs", harness.span_names(spans), time.perf_counter() - began)
        measured = [bench_client(model_path, swarm, spans, prompt, args, mode == "on") for mode in args.push]
        rtt_ms = bare_round_trip_ms(min(swarm.online_ports()))
        for fields, _ in measured:
            fields["bare_grpc_rtt_ms"] = rtt_ms
    finally:
        swarm.stop()
    return measured


def bare_round_trip_ms(port: int, calls: int = 200) -> float:
    """Median round trip of an ``Info`` call to a server on loopback: gRPC's own cost, nearly no work."""
    import grpc

    from shardnet.wire import pb, pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ShardStub(channel)
        times = []
        for _ in range(calls):
            began = time.perf_counter()
            stub.Info(pb.InfoRequest(), timeout=10)
            times.append(time.perf_counter() - began)
    return harness.ms(harness.median(times[10:]))


def bench_client(model_path, swarm, spans, prompt, args, push: bool) -> tuple[dict, torch.Tensor]:
    model = ShardedModel.from_pretrained(
        model_path, initial_peers=swarm.initial_peers, dtype=harness.torch_dtype(args.dtype), push=push
    )
    decode_steps: list[list] = []
    try:

        def generate(ids, new_tokens, streamer):
            max_length = ids.shape[1] + new_tokens
            with model.inference_session(max_length=max_length) as conversation:
                out = model.generate(ids, max_new_tokens=new_tokens, streamer=streamer, **GREEDY)
            if streamer is not None:  # timed run: its decode steps (step 0 is the prefill), once closing
                decode_steps.extend(conversation.step_timings[1:])  # read the answers still owed
            return out

        runs, tokens = timed_runs(generate, prompt, args)
        route = [(hop.start, hop.end) for hop in model.route()]
    finally:
        model.close()
    fields = dict(
        servers=len(spans),
        spans=harness.span_names(spans),
        hops=len(route),
        push=push,
        **speed_fields(runs, args.batch),
    )
    timed = [step for step in decode_steps if not step.pending and len(step.hops) == len(route)]
    if timed:
        fields.update(step_fields(timed), hop_split=hop_split(timed, harness.span_names(route)))
    fields["steps_timed"] = f"{len(timed)}/{len(decode_steps)}"  # the rest: pending, or rerouted
    return fields, tokens


def plot(results: list[dict], path: Path) -> None:
    fig, (speed, split) = harness.new_figure(2)
    local = next(r for r in results if r["servers"] == 0)
    swarms = [r for r in results if r["servers"] > 0]
    speed.axhline(local["tokens_per_s"], color="grey", linestyle="--", label="local transformers")
    speed.plot([r["servers"] for r in swarms], [r["tokens_per_s"] for r in swarms], "o-", label="swarm")
    speed.set_xticks([r["servers"] for r in swarms])
    speed.set_xlabel("servers (= hops)")
    speed.set_ylabel("decode tokens/s")
    speed.set_ylim(bottom=0)
    speed.legend()
    labels, parts = [], {name.replace("_s", "_ms"): [] for name in HOP_PARTS}
    for r in swarms:
        for hop in r.get("hop_split", []):
            labels.append(f"{r['servers']}srv {'push' if r.get('push', True) else 'chained'}\n{hop['span']}")
            for name in parts:
                parts[name].append(hop[name])
    bottom = [0.0] * len(labels)
    for name, values in parts.items():
        split.bar(range(len(labels)), values, bottom=bottom, label=name.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    split.set_xticks(range(len(labels)), labels, fontsize=7)
    split.set_ylabel("ms per decode step, per hop")
    split.legend(fontsize=8)
    r = local
    title = f"{r['model']} {r['dtype']} batch {r['batch']} prompt {r['prompt_len']} new {r['new_tokens']}"
    harness.save_figure(fig, path, title)


def main() -> None:
    args = parse_args()
    harness.setup(args)
    model_path = harness.resolve_model(args.model)
    blocks = harness.num_blocks(model_path)
    from shardnet.models import load_config

    prompt = harness.random_prompt(load_config(model_path).vocab_size, args.batch, args.prompt_len)
    common = dict(
        model=args.model,
        dtype=args.dtype,
        batch=args.batch,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
    )
    results = []
    with harness.time_limit(args.time_limit_s):
        fields, local_tokens = bench_local(model_path, prompt, args)
        local = harness.record("hops", kind="local", **common, **fields)
        harness.emit(local)
        results.append(local)
        for servers in args.servers:
            if servers > blocks:
                logger.info("skipping %d servers: the model has only %d blocks", servers, blocks)
                continue
            for fields, tokens in bench_swarm(model_path, even_spans(blocks, servers), prompt, args):
                emit_swarm(results, local, common, fields, tokens, local_tokens, args)
    if args.plot:
        plot(results, args.plot)


def emit_swarm(results, local, common, fields, tokens, local_tokens, args) -> None:
    """One swarm line: its speed, the overhead per hop over local transformers, where the step's time went."""
    overhead_ms = (fields["decode_step_ms"] - local["decode_step_ms"]) / fields["hops"]
    in_hops_ms = fields.get("step_ms", 0.0)  # the steps through the servers, as the client measured them
    compute_ms = sum(hop["compute_ms"] for hop in fields.get("hop_split", []))
    # The per-hop budget: the step through the chain (the client sending it to holding its output) beyond
    # its servers' compute, per hop, less one bare gRPC round trip.
    beyond_ms = (in_hops_ms - compute_ms) / fields["hops"] - fields["bare_grpc_rtt_ms"]
    result = harness.record(
        "hops",
        kind="swarm",
        **common,
        **fields,
        per_hop_overhead_ms=round(overhead_ms, 3),
        per_hop_beyond_compute_and_rtt_ms=round(beyond_ms, 3) if compute_ms else None,
        speed_vs_local=round(fields["tokens_per_s"] / local["tokens_per_s"], 3),
        outside_hops_ms=round(fields["decode_step_ms"] - in_hops_ms, 3) if in_hops_ms else None,
        tokens_match=bool(torch.equal(tokens, local_tokens)),
        server_torch_threads=harness.threads_label(args.server_threads),
    )
    harness.emit(result)
    results.append(result)


if __name__ == "__main__":
    main()
