"""Prefix reuse: time to first token of a request whose long system prompt the servers kept, against the
first request with that prompt.

    python benchmarks/prefix.py --model mid --servers 2 --system-tokens 1000 --rounds 3 --plot prefix.png

Each round draws a new random system prompt of --system-tokens tokens and sends two requests through
one ``ShardedModel``: the system prompt with one user message, then with another (--user-tokens each).
The first computes the whole prefill; the second should find the system prompt's whole blocks kept on
every server and compute only the rest. Both outputs are compared with local transformers' greedy
tokens. One JSON line per round (both TTFTs, their ratio, the prefix hits the servers counted), then
one summary line with the median ratio and whether every output matched. ``--no-reuse`` starts the
servers with ``--prefix-cache-tokens 0``, for comparison.
"""

from __future__ import annotations

import argparse
import logging
import time

import grpc
import harness
import torch
from transformers import AutoModelForCausalLM

from shardnet import ShardedModel
from shardnet.launch import LocalSwarm, even_spans
from shardnet.models import load_config
from shardnet.wire import pb, pb_grpc

logger = logging.getLogger("benchmarks.prefix")
GREEDY = dict(do_sample=False, eos_token_id=None)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(parser, default_model="mid")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--user-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-reuse", action="store_true", help="servers keep no prefixes (comparison)")
    return parser.parse_args()


def prefix_counts(ports: list[int]) -> dict[int, tuple[int, int]]:
    counts = {}
    for port in ports:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = pb_grpc.ShardStub(channel).Info(pb.InfoRequest(), timeout=10)
        counts[port] = (info.prefix_hits, info.prefix_tokens_reused)
    return counts


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    clock = harness.TokenClock()
    out = model.generate(ids, max_new_tokens=new_tokens, streamer=clock, **GREEDY)
    return out, clock.summary()["ttft_s"]


def main() -> None:
    args = parse_args()
    harness.setup(args)
    model_path = harness.resolve_model(args.model)
    vocab = load_config(model_path).vocab_size
    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=harness.torch_dtype(args.dtype)).eval()
    spans = even_spans(harness.num_blocks(model_path), args.servers)
    swarm = LocalSwarm(
        model_path,
        spans,
        dtype=args.dtype,
        log_dir=harness.swarm_log_dir(args.log_dir, "prefix"),
        torch_threads=args.server_threads,
        extra_args=["--prefix-cache-tokens", "0"] if args.no_reuse else [],
    )
    common = dict(
        model=args.model,
        dtype=args.dtype,
        servers=args.servers,
        spans=harness.span_names(spans),
        system_tokens=args.system_tokens,
        user_tokens=args.user_tokens,
        reuse=not args.no_reuse,
        server_torch_threads=harness.threads_label(args.server_threads),
    )
    ratios, all_match, rounds = [], True, []
    with harness.time_limit(args.time_limit_s):
        swarm.start(timeout_s=600)
        try:
            ports = sorted(swarm.online_ports())
            with ShardedModel.from_pretrained(
                model_path, initial_peers=swarm.initial_peers, dtype=harness.torch_dtype(args.dtype)
            ) as model:
                timed_generate(model, harness.random_prompt(vocab, 1, 40, seed=99), 2)  # warm-up
                for index in range(args.rounds):
                    system = harness.random_prompt(vocab, 1, args.system_tokens, seed=1000 + index)
                    before = prefix_counts(ports)
                    result, match = {}, True
                    for name, seed in (("first", 2000 + index), ("second", 3000 + index)):
                        user = harness.random_prompt(vocab, 1, args.user_tokens, seed=seed)
                        ids = torch.cat([system, user], dim=1)
                        out, ttft = timed_generate(model, ids, args.new_tokens)
                        with torch.inference_mode():
                            want = local.generate(ids, max_new_tokens=args.new_tokens, **GREEDY)
                        match = match and torch.equal(out, want)
                        result[f"{name}_ttft_ms"] = harness.ms(ttft)
                    after = prefix_counts(ports)
                    ratio = result["second_ttft_ms"] / result["first_ttft_ms"]
                    line = harness.record(
                        "prefix",
                        **common,
                        round=index,
                        **result,
                        ttft_ratio=round(ratio, 3),
                        outputs_match=match,
                        hits_per_server=[after[p][0] - before[p][0] for p in ports],
                        tokens_reused_per_server=[after[p][1] - before[p][1] for p in ports],
                    )
                    harness.emit(line)
                    rounds.append(line)
                    ratios.append(ratio)
                    all_match = all_match and match
        finally:
            swarm.stop()
    harness.emit(
        harness.record(
            "prefix.summary",
            **common,
            rounds=args.rounds,
            ttft_ratio_median=round(harness.median(ratios), 3),
            target_ratio=0.35,
            outputs_match=all_match,
        )
    )
    if args.plot:
        plot(rounds, args)


def plot(rounds: list[dict], args: argparse.Namespace) -> None:
    fig, (axis,) = harness.new_figure(1)
    xs = range(len(rounds))
    axis.bar([x - 0.2 for x in xs], [r["first_ttft_ms"] for r in rounds], 0.4, label="first request")
    axis.bar([x + 0.2 for x in xs], [r["second_ttft_ms"] for r in rounds], 0.4, label="same system prompt")
    axis.set_xticks(list(xs), [f"round {r['round']}" for r in rounds])
    axis.set_ylabel("time to first token, ms")
    axis.legend()
    title = f"{args.model} {args.dtype}, {args.servers} servers, system prompt {args.system_tokens} tokens"
    harness.save_figure(fig, args.plot, title)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    logger.info("done in %.1fs", time.perf_counter() - started)
