"""What --quant costs and saves: span memory, decode speed and logit deviation per mode.

    python benchmarks/quant.py --model smollm2 --modes none int8 nf4 --new-tokens 64 --plot quant.png

For each mode, one JSON line:
- memory: the span's parameters and buffers after quantization (bytes counted in-process, with the
  quantization scales), and the RSS / peak RSS of a real ``shardnet serve --quant MODE`` process;
- speed: the span's own decode step (in-process, one token with a KV cache, --server-threads threads)
  and the swarm's decode tokens/s with a client that accepts that mode;
- accuracy against unquantized float weights (local transformers, which a float32 swarm equals to
  1e-4): mean and max abs logit difference of full forwards over --prompts prompts, and, over
  --new-tokens greedy tokens (no EOS) per prompt, the fraction of positions whose token equals the
  unquantized run's and the first position where they differ (null: never).
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
from shardnet.models import Checkpoint, SpanInputs, adapter_for, load_config
from shardnet.models.quantization import QUANT_MODES, module_bytes, quantize_span

logger = logging.getLogger("benchmarks.quant")
GREEDY = dict(do_sample=False, eos_token_id=None)  # no EOS: exactly --new-tokens tokens
PROMPTS = (  # plain text for a model with a tokenizer; random ids otherwise
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To make a cup of tea, first",
)
SPAN_PREFILL = 16  # positions in the cache before the span's timed decode steps


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(parser, default_model="smollm2")
    parser.add_argument("--modes", nargs="+", choices=QUANT_MODES, default=list(QUANT_MODES))
    parser.add_argument("--servers", type=int, default=1, help="servers, blocks split evenly, all of a mode")
    parser.add_argument("--prompts", type=int, default=4, help=f"prompts (at most {len(PROMPTS)} texts)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--span-steps", type=int, default=32, help="timed in-process decode steps")
    return parser.parse_args()


def prompts(model_path: Path, count: int) -> list[torch.Tensor]:
    """[1, seq] token ids per prompt: the texts above if the model has a tokenizer, else random ids."""
    if (model_path / "tokenizer.json").is_file() or (model_path / "tokenizer.model").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        return [tokenizer(text, return_tensors="pt").input_ids for text in PROMPTS[:count]]
    vocab = load_config(model_path).vocab_size
    return [harness.random_prompt(vocab, 1, 8 + index, seed=index) for index in range(count)]


def reference(model_path: Path, inputs: list[torch.Tensor], args) -> tuple[list, list]:
    """Unquantized logits of each prompt and its greedy continuation, from local transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=harness.torch_dtype(args.dtype)).eval()
    logits, tokens = [], []
    with torch.inference_mode():
        for ids in inputs:
            logits.append(model(ids).logits.float())  # [1, seq, vocab]
            out = model.generate(ids, max_new_tokens=args.new_tokens, **GREEDY)
            tokens.append(out[0, ids.shape[1] :])
    return logits, tokens


def span_fields(model_path: Path, spans: list[tuple[int, int]], mode: str, args) -> dict:
    """Bytes of the quantized spans and the first span's decode step, measured in this process."""
    config = load_config(model_path)
    adapter = adapter_for(config)
    dtype = harness.torch_dtype(args.dtype)
    total, step_s = 0, []
    threads = torch.get_num_threads()
    torch.set_num_threads(args.server_threads or threads)
    try:
        for index, (start, end) in enumerate(spans):
            span = adapter.load_span(Checkpoint(model_path), config, start, end, dtype)
            quantize_span(span, mode, torch.device("cpu"))
            if index == 0:
                step_s = time_span(span, int(config.hidden_size), dtype, args.span_steps)
            total += module_bytes(span)  # after a step: the CPU nf4 kernel repacks weights on first use
            del span
    finally:
        torch.set_num_threads(threads)
    return {
        "span_mib": harness.mib(total),
        "span_step_ms_p50": harness.ms(harness.median(step_s)),
        "span_step_blocks": spans[0][1] - spans[0][0],
    }


def time_span(span, hidden_size: int, dtype: torch.dtype, steps: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, SPAN_PREFILL + steps, hidden_size, generator=generator).to(dtype)
    cache = span.new_cache()
    positions = torch.arange(SPAN_PREFILL).unsqueeze(0)  # [1, prefill]
    span.run(hidden[:, :SPAN_PREFILL], SpanInputs(None, positions), cache, span.start, span.end)
    times = []
    for position in range(SPAN_PREFILL, SPAN_PREFILL + steps):
        began = time.perf_counter()
        span.run(
            hidden[:, position : position + 1],  # [1, 1, hidden]
            SpanInputs(None, torch.tensor([[position]])),
            cache,
            span.start,
            span.end,
        )
        times.append(time.perf_counter() - began)
    return times


def swarm_fields(
    model_path: Path, spans, mode: str, inputs, want_logits, want_tokens, args
) -> tuple[dict, dict]:
    """A swarm of --quant MODE servers: their RSS, decode speed, and deviation from the reference."""
    swarm = LocalSwarm(
        model_path,
        spans,
        dtype=args.dtype,
        extra_args=["--quant", mode],
        log_dir=harness.swarm_log_dir(args.log_dir, f"quant-{mode}"),
        torch_threads=args.server_threads,
    )
    try:
        swarm.start(timeout_s=600)
        pids = [process.pid for process in swarm.servers]
        memory = {
            "server_rss_mib": harness.mib(sum(harness.rss_bytes(pid) for pid in pids)),
            "server_peak_rss_mib": harness.mib(sum(harness.peak_rss_bytes(pid) for pid in pids)),
        }
        dtype = harness.torch_dtype(args.dtype)
        with ShardedModel.from_pretrained(model_path, swarm.initial_peers, dtype=dtype, quant=mode) as model:
            model.generate(inputs[0], max_new_tokens=4, **GREEDY)  # warm-up
            diffs, agreements, divergences, runs = [], [], [], []
            for ids, logits, tokens in zip(inputs, want_logits, want_tokens, strict=True):
                diffs.append((model(ids).logits.float() - logits).abs().flatten())
                clock = harness.TokenClock()
                got = model.generate(ids, max_new_tokens=args.new_tokens, streamer=clock, **GREEDY)
                got = got[0, ids.shape[1] :]
                runs.append(clock.summary())
                same = got == tokens
                agreements.append(same.float().mean().item())
                differ = (~same).nonzero()
                divergences.append(int(differ[0]) if len(differ) else None)
        memory["server_rss_after_decode_mib"] = harness.mib(sum(harness.rss_bytes(pid) for pid in pids))
    finally:
        swarm.stop()
    every = torch.cat(diffs)
    step_s = harness.median([run["decode_step_s"] for run in runs])
    return memory, {
        "tokens_per_s": round(1 / step_s, 3),
        "decode_step_ms": harness.ms(step_s),
        "logit_abs_diff_mean": round(every.mean().item(), 5),
        "logit_abs_diff_max": round(every.max().item(), 5),
        "greedy_agreement": round(sum(agreements) / len(agreements), 4),
        "greedy_agreement_per_prompt": [round(a, 4) for a in agreements],
        "first_divergence_per_prompt": divergences,
    }


def plot(results: list[dict], path: Path) -> None:
    fig, (memory, speed, deviation) = harness.new_figure(3, width_in=4.5)
    modes = [r["quant"] for r in results]
    memory.bar(modes, [r["span_mib"] for r in results], label="span weights")
    memory.plot(modes, [r["server_rss_mib"] for r in results], "ko-", label="server RSS")
    memory.set_ylabel("MiB")
    memory.legend(fontsize=8)
    speed.bar(modes, [r["tokens_per_s"] for r in results])
    speed.set_ylabel("swarm decode tokens/s")
    deviation.bar(modes, [r["greedy_agreement"] for r in results], label="greedy agreement")
    deviation.set_ylim(0, 1.05)
    deviation.set_ylabel(f"greedy agreement over {results[0]['new_tokens']} tokens")
    twin = deviation.twinx()
    twin.plot(modes, [r["logit_abs_diff_mean"] for r in results], "ro-", label="mean |logit diff|")
    twin.set_ylabel("mean |logit diff|", color="red")
    r = results[0]
    harness.save_figure(fig, path, f"--quant on {r['model']} {r['dtype']}, {r['servers']} server(s)")


def main() -> None:
    args = parse_args()
    harness.setup(args)
    model_path = harness.resolve_model(args.model)
    spans = even_spans(harness.num_blocks(model_path), args.servers)
    inputs = prompts(model_path, args.prompts)
    results = []
    with harness.time_limit(args.time_limit_s):
        want_logits, want_tokens = reference(model_path, inputs, args)
        for mode in args.modes:
            fields = span_fields(model_path, spans, mode, args)
            memory, quality = swarm_fields(model_path, spans, mode, inputs, want_logits, want_tokens, args)
            base = next((r for r in results if r["quant"] == "none"), None)
            result = harness.record(
                "quant",
                model=args.model,
                servers=len(spans),
                spans=harness.span_names(spans),
                dtype=args.dtype,
                quant=mode,
                **fields,
                **memory,
                **quality,
                span_mib_vs_none=round(fields["span_mib"] / base["span_mib"], 3) if base else None,
                speed_vs_none=round(quality["tokens_per_s"] / base["tokens_per_s"], 3) if base else None,
                prompts=len(inputs),
                prompt_lens=[ids.shape[1] for ids in inputs],
                new_tokens=args.new_tokens,
                server_torch_threads=harness.threads_label(args.server_threads),
            )
            harness.emit(result)
            results.append(result)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
