"""Decode speed and time to first token under emulated network latency, against the performance model.

    python benchmarks/wan.py --model tiny --servers 3 6 --rtt-ms 0 10 50 100 --assisted --plot wan.png

Every server of a swarm sits behind its own port of a latency-adding TCP proxy (``delay_proxy.py``, one
process per swarm, so it does not share this process's GIL) and announces that port with
``shardnet serve --announce-port``, so the client dials every server through the proxy. An RTT of R ms
per hop is a one-way delay of R/2 ms each direction (``--bandwidth-mbps`` also caps each direction).

Per (servers, push, assisted, RTT), one JSON line: decode tokens/s (greedy, no EOS, exactly --new-tokens
tokens; the decode phase only, after the first token), time to first token, and the decode speed the
design's performance model predicts (compute + overheads + 2 one-way delays per hop, or hops + 1 delays
with push), the compute and overheads taken from the RTT-0 line of the same configuration:
client-chained, per target step, ``t = t(RTT 0) + hops x RTT``; with push ``t = t(RTT 0) + (hops + 1) x
RTT / 2``. ``--push on`` needs ``ShardedModel.from_pretrained(push=...)``; without it only ``off`` runs.
``--assisted`` adds assisted decoding with a local draft of the same vocabulary, two kinds (``--draft``):
``truncated``, the target's own first ``--draft-layers`` blocks with its embeddings, final norm and LM
head (cheap; the default for a real model); ``noisy``, every block of the target with Gaussian noise of
``--draft-noise`` times each weight matrix's std added (the default for random models, on which a
truncated draft agrees with the target on almost no token: measured 0-4 of 32 on ``tiny`` with 1-4 of 8
blocks). The draft proposes ``--draft-tokens`` tokens per round, with no confidence cut-off, and each line
reports ``target_steps_per_token`` (target forward calls per decode token: 1 without a draft).
"""

from __future__ import annotations

import argparse
import logging
import socket
import time
from pathlib import Path

import harness
import torch
from delay_proxy import DelayProxy

from shardnet import ShardedModel
from shardnet.launch import LocalSwarm, even_spans

logger = logging.getLogger("benchmarks.wan")
GREEDY = dict(do_sample=False, eos_token_id=None)  # no EOS: exactly max_new_tokens tokens


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(parser)
    parser.add_argument("--servers", type=int, nargs="+", default=[3, 6], help="swarm sizes (= hops)")
    parser.add_argument(
        "--rtt-ms", type=float, nargs="+", default=[0, 10, 50, 100], help="round trip per hop, ms"
    )
    parser.add_argument("--bandwidth-mbps", type=float, default=0.0, help="cap per direction; 0 = none")
    parser.add_argument("--push", nargs="+", choices=["on", "off"], default=["off", "on"])
    parser.add_argument("--assisted", action="store_true", help="also run assisted decoding with a draft")
    parser.add_argument(
        "--draft",
        choices=["auto", "truncated", "noisy"],
        default="auto",
        help="draft for --assisted; auto: noisy for random models (tiny, mid, random:...), else truncated",
    )
    parser.add_argument("--draft-layers", type=int, default=2, help="blocks a truncated draft keeps")
    parser.add_argument(
        "--draft-noise", type=float, default=0.02, help="noisy draft: noise std / each weight's std"
    )
    parser.add_argument("--draft-tokens", type=int, default=4, help="candidate tokens per draft round")
    parser.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens (seeded)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per line; medians reported")
    args = parser.parse_args()
    if min(args.rtt_ms) < 0 or args.bandwidth_mbps < 0:
        parser.error("--rtt-ms and --bandwidth-mbps must be >= 0")
    if args.new_tokens < 2 or args.repeats < 1 or args.draft_layers < 1 or args.draft_tokens < 1:
        parser.error("--new-tokens must be >= 2; --repeats, --draft-layers, --draft-tokens >= 1")
    if args.draft_noise < 0:
        parser.error("--draft-noise must be >= 0")
    if args.draft == "auto":
        random_model = args.model in harness.RANDOM_MODELS or args.model.startswith("random:")
        args.draft = "noisy" if random_model else "truncated"
    if 0 not in args.rtt_ms:  # the baseline of every prediction
        args.rtt_ms = [0.0, *args.rtt_ms]
    args.rtt_ms = sorted(set(args.rtt_ms))
    return args


def push_modes(wanted: list[str]) -> list[bool]:
    """The push settings to run, off first."""
    return [mode == "on" for mode in ["off", "on"] if mode in wanted]


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (bound together, then released) for the servers' --port."""
    probes = [socket.socket() for _ in range(n)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def load_draft(model_path: Path, args: argparse.Namespace) -> torch.nn.Module:
    """A local model of the target's vocabulary that agrees with it on some tokens (see --draft)."""
    import transformers
    from transformers import AutoModelForCausalLM

    layers = {"num_hidden_layers": args.draft_layers} if args.draft == "truncated" else {}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a truncated draft leaves the other blocks' weights unused
    try:
        draft = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=harness.torch_dtype(args.dtype), **layers
        ).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    if args.draft == "noisy":
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for name, weight in draft.named_parameters():
                if ".layers." in name and weight.dim() == 2:
                    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
                    weight.add_((noise * weight.float().std() * args.draft_noise).to(weight.dtype))
    draft.generation_config.num_assistant_tokens = args.draft_tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0  # always propose --draft-tokens tokens
    return draft


class TokenStamps:
    """A generate() streamer: the time and number of new tokens of each put after the prompt's.

    Greedy puts one token per step; assisted decoding puts every token a target step accepted at once.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stamps: list[tuple[float, int]] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.stamps.append((time.perf_counter(), value.shape[-1] if value.dim() == 2 else 1))

    def end(self) -> None:
        pass

    def summary(self) -> dict:
        """TTFT; decode tokens/s over the tokens after the first put (None if all came in one)."""
        (first_at, _), (last_at, _) = self.stamps[0], self.stamps[-1]
        decode_tokens = sum(n for _, n in self.stamps[1:])
        return {
            "ttft_s": first_at - self.started,
            "decode_tokens": decode_tokens,
            "decode_tok_s": decode_tokens / (last_at - first_at) if decode_tokens else None,
        }


def measure(model: ShardedModel, prompt: torch.Tensor, args: argparse.Namespace, draft=None) -> dict:
    """--repeats timed generates: medians of TTFT and decode tokens/s, target steps per decode token."""
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    runs, tokens = [], None
    try:
        for _ in range(args.repeats):
            stamps = TokenStamps()
            calls.clear()
            tokens = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.new_tokens,
                streamer=stamps,
                assistant_model=draft,
                **GREEDY,
            )
            if tokens.shape[1] - prompt.shape[1] != args.new_tokens:
                raise RuntimeError(
                    f"asked for {args.new_tokens} tokens, got {tokens.shape[1] - prompt.shape[1]}"
                )
            summary = stamps.summary()
            # Every forward after the first (prefill, and with a draft its first candidates) is a decode step.
            summary["steps_per_token"] = (len(calls) - 1) / summary["decode_tokens"]
            runs.append(summary)
    finally:
        hook.remove()
    speeds = [r["decode_tok_s"] for r in runs if r["decode_tok_s"]]
    return {
        "decode_tok_s": round(harness.median(speeds), 3) if speeds else None,
        "ttft_s": round(harness.median([r["ttft_s"] for r in runs]), 4),
        "target_steps_per_token": round(harness.median([r["steps_per_token"] for r in runs]), 3),
        "tokens": tokens,
    }


def network_s_per_step(rtt_ms: float, hops: int, push: bool) -> float:
    """The performance model's network time of one target step: 2d per hop, or (hops + 1) d with push."""
    one_way_s = rtt_ms / 2000
    return (hops + 1) * one_way_s if push else 2 * hops * one_way_s


def prediction(base: dict, measured: dict, rtt_ms: float, hops: int, push: bool) -> dict:
    """Decode tokens/s predicted from the RTT-0 line of the same configuration (its compute + overheads)."""
    if not base.get("decode_tok_s") or not measured.get("decode_tok_s"):
        return {"predicted_decode_tok_s": None, "predicted_network_ms_per_token": None}
    network_s = measured["target_steps_per_token"] * network_s_per_step(rtt_ms, hops, push)
    return {
        "predicted_decode_tok_s": round(1 / (1 / base["decode_tok_s"] + network_s), 3),
        "predicted_network_ms_per_token": harness.ms(network_s),
    }


def bench_swarm(
    model_path: Path, spans: list[tuple[int, int]], prompt: torch.Tensor, args: argparse.Namespace, draft
) -> list[dict]:
    """One swarm behind one proxy process; every push mode, RTT and decoding mode on it."""
    log_dir = harness.swarm_log_dir(args.log_dir, f"servers{len(spans)}")
    real_ports = free_ports(len(spans))
    proxy = DelayProxy(real_ports, log_path=log_dir / "delay_proxy.log" if log_dir else None)
    results = []
    try:
        dial = proxy.start()
        server_args = [["--port", str(port), "--announce-port", str(dial[port])] for port in real_ports]
        swarm = LocalSwarm(
            model_path,
            spans,
            dtype=args.dtype,
            log_dir=log_dir,
            torch_threads=args.server_threads,
            server_args=server_args,
        )
        try:
            began = time.perf_counter()
            swarm.start(timeout_s=600)
            logger.info("swarm %s up in %.1fs", harness.span_names(spans), time.perf_counter() - began)
            for push in push_modes(args.push):
                results += bench_client(model_path, swarm, proxy, spans, prompt, args, push, draft)
        finally:
            swarm.stop()
    finally:
        proxy.stop()
    return results


def bench_client(model_path, swarm, proxy, spans, prompt, args, push: bool, draft) -> list[dict]:
    model = ShardedModel.from_pretrained(
        model_path, initial_peers=swarm.initial_peers, dtype=harness.torch_dtype(args.dtype), push=push
    )
    modes = [None, draft] if draft is not None else [None]
    results, base, reference = [], {}, None
    try:
        hops = len(model.route())
        for mode in modes:  # warm-up at RTT 0: channels, sessions, the draft
            model.generate(prompt, max_new_tokens=4, assistant_model=mode, **GREEDY)
        for rtt_ms in args.rtt_ms:
            proxy.set(rtt_ms / 2, args.bandwidth_mbps)
            for mode in modes:
                assisted = mode is not None
                before = proxy.stats()
                measured = measure(model, prompt, args, mode)
                after = proxy.stats()
                tokens = measured.pop("tokens")
                reference = tokens if reference is None else reference
                base.setdefault(assisted, measured)
                wire_bytes = sum(after[k] - before[k] for k in ("bytes_to_server", "bytes_to_client"))
                result = harness.record(
                    "wan",
                    model=args.model,
                    dtype=args.dtype,
                    servers=len(spans),
                    spans=harness.span_names(spans),
                    hops=hops,
                    push=push,
                    assisted=assisted,
                    rtt_ms=rtt_ms,
                    one_way_delay_ms=rtt_ms / 2,
                    bandwidth_mbps=args.bandwidth_mbps or None,
                    prompt_len=prompt.shape[1],
                    new_tokens=args.new_tokens,
                    repeats=args.repeats,
                    **measured,
                    **prediction(base[assisted], measured, rtt_ms, hops, push),
                    # Every line's tokens equal the first (plain, RTT 0): latency and drafts change no token.
                    tokens_match=bool(torch.equal(tokens, reference)),
                    **(draft_fields(args) if assisted else {}),
                    proxy_bytes_per_token=round(wire_bytes / (args.repeats * args.new_tokens)),
                    proxy_connections=after["connections"],
                    server_torch_threads=harness.threads_label(args.server_threads),
                )
                harness.emit(result)
                results.append(result)
    finally:
        model.close()
    return results


def draft_fields(args: argparse.Namespace) -> dict:
    shape = (
        {"draft_layers": args.draft_layers}
        if args.draft == "truncated"
        else {"draft_noise": args.draft_noise}
    )
    return {"draft": args.draft, **shape, "draft_tokens": args.draft_tokens}


def plot(results: list[dict], path: Path) -> None:
    fig, (speed, ttft) = harness.new_figure(2)
    keys = sorted({(r["servers"], r["push"], r["assisted"]) for r in results})
    for index, key in enumerate(keys):
        lines = sorted(
            (r for r in results if (r["servers"], r["push"], r["assisted"]) == key), key=lambda r: r["rtt_ms"]
        )
        color = f"C{index}"
        label = f"{key[0]} servers" + (", push" if key[1] else "") + (", assisted" if key[2] else "")
        rtts = [r["rtt_ms"] for r in lines]
        speed.plot(rtts, [r["decode_tok_s"] for r in lines], "o-", color=color, label=label)
        speed.plot(
            rtts, [r["predicted_decode_tok_s"] for r in lines], "x--", color=color, label=f"{label} (model)"
        )
        ttft.plot(rtts, [r["ttft_s"] for r in lines], "o-", color=color, label=label)
    speed.set_xlabel("RTT per hop, ms")
    speed.set_ylabel("decode tokens/s")
    speed.set_yscale("log")
    speed.legend(fontsize=7)
    ttft.set_xlabel("RTT per hop, ms")
    ttft.set_ylabel("time to first token, s")
    ttft.set_ylim(bottom=0)
    ttft.legend(fontsize=7)
    r = results[0]
    title = f"{r['model']} {r['dtype']} prompt {r['prompt_len']} new {r['new_tokens']}: measured (solid), predicted (dashed)"
    harness.save_figure(fig, path, title)


def main() -> None:
    args = parse_args()
    harness.setup(args)
    model_path = harness.resolve_model(args.model)
    blocks = harness.num_blocks(model_path)
    from shardnet.models import load_config

    prompt = harness.random_prompt(load_config(model_path).vocab_size, 1, args.prompt_len)  # [1, seq]
    draft = load_draft(model_path, args) if args.assisted else None
    results = []
    with harness.time_limit(args.time_limit_s):
        for servers in args.servers:
            if servers > blocks:
                logger.info("skipping %d servers: the model has only %d blocks", servers, blocks)
                continue
            results += bench_swarm(model_path, even_spans(blocks, servers), prompt, args, draft)
    if args.plot and results:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
