"""Forward (prefill) throughput: plain ``model(input_ids)`` through the swarm vs local transformers.

    python benchmarks/forward.py --model smollm2 --servers 2 --shapes 1x512 8x128 --plot forward.png

Outside an inference session ShardedModel's forward uses the unary Forward RPC (no KV cache), so this
measures full-sequence throughput. One JSON line per shape: tokens/s of both, their ratio, and the
largest logit difference between them.
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
from shardnet.models import load_config

logger = logging.getLogger("benchmarks.forward")


def shape(text: str) -> tuple[int, int]:
    batch, _, seq = text.partition("x")
    try:
        return int(batch), int(seq)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be BATCHxSEQ, e.g. 8x128") from None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(parser)
    parser.add_argument("--servers", type=int, default=2, help="swarm size, spans split evenly")
    parser.add_argument(
        "--shapes", type=shape, nargs="+", default=[(1, 512), (8, 128)], help="BATCHxSEQ inputs"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per shape; median reported")
    return parser.parse_args()


def timed(forward, ids: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """One warm-up, then the median of ``repeats`` forwards, seconds; and the last logits."""
    logits = forward(ids)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        logits = forward(ids)
        times.append(time.perf_counter() - began)
    return harness.median(times), logits


def bench_local(model_path: Path, inputs: list[torch.Tensor], args: argparse.Namespace) -> list:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=harness.torch_dtype(args.dtype)).eval()

    def forward(ids):
        with torch.inference_mode():
            return model(ids, use_cache=False).logits  # [batch, seq, vocab]

    return [timed(forward, ids, args.repeats) for ids in inputs]


def bench_swarm(
    model_path: Path, spans: list[tuple[int, int]], inputs: list[torch.Tensor], args: argparse.Namespace
) -> list:
    swarm = LocalSwarm(
        model_path,
        spans,
        dtype=args.dtype,
        log_dir=harness.swarm_log_dir(args.log_dir, f"servers{len(spans)}"),
        torch_threads=args.server_threads,
    )
    try:
        swarm.start(timeout_s=600)
        model = ShardedModel.from_pretrained(
            model_path, initial_peers=swarm.initial_peers, dtype=harness.torch_dtype(args.dtype)
        )
        try:
            return [timed(lambda ids: model(ids).logits, ids, args.repeats) for ids in inputs]
        finally:
            model.close()
    finally:
        swarm.stop()


def plot(results: list[dict], path: Path) -> None:
    fig, (axis,) = harness.new_figure(1, width_in=7.0)
    labels = [f"{r['batch']}x{r['prompt_len']}" for r in results]
    where = range(len(results))
    axis.bar([i - 0.2 for i in where], [r["local_tokens_per_s"] for r in results], 0.4, label="local")
    axis.bar(
        [i + 0.2 for i in where],
        [r["swarm_tokens_per_s"] for r in results],
        0.4,
        label=f"swarm, {results[0]['servers']} servers",
    )
    for i, r in zip(where, results, strict=True):
        axis.annotate(
            f"x{r['swarm_to_local_ratio']:.2f}", (i + 0.2, r["swarm_tokens_per_s"]), ha="center", va="bottom"
        )
    axis.margins(y=0.12)
    axis.set_xticks(list(where), labels)
    axis.set_xlabel("batch x sequence")
    axis.set_ylabel("forward tokens/s")
    axis.legend()
    harness.save_figure(fig, path, f"forward throughput: {results[0]['model']} {results[0]['dtype']}")


def main() -> None:
    args = parse_args()
    harness.setup(args)
    model_path = harness.resolve_model(args.model)
    vocab = load_config(model_path).vocab_size
    inputs = [harness.random_prompt(vocab, batch, seq, seed=i) for i, (batch, seq) in enumerate(args.shapes)]
    spans = even_spans(harness.num_blocks(model_path), args.servers)
    results = []
    with harness.time_limit(args.time_limit_s):
        local = bench_local(model_path, inputs, args)  # first, while no server competes for the CPU
        swarm = bench_swarm(model_path, spans, inputs, args)
    for (batch, seq), (local_s, local_logits), (swarm_s, swarm_logits) in zip(
        args.shapes, local, swarm, strict=True
    ):
        tokens = batch * seq
        result = harness.record(
            "forward",
            model=args.model,
            servers=len(spans),
            spans=harness.span_names(spans),
            dtype=args.dtype,
            batch=batch,
            prompt_len=seq,
            new_tokens=0,
            repeats=args.repeats,
            local_ms=harness.ms(local_s),
            swarm_ms=harness.ms(swarm_s),
            local_tokens_per_s=round(tokens / local_s, 1),
            swarm_tokens_per_s=round(tokens / swarm_s, 1),
            swarm_to_local_ratio=round(local_s / swarm_s, 3),
            max_abs_logit_diff=float((swarm_logits.float() - local_logits.float()).abs().max()),
            server_torch_threads=harness.threads_label(args.server_threads),
        )
        harness.emit(result)
        results.append(result)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
