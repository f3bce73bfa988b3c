"""GPU figures in one run: a 13B-shaped Llama as 4 servers x 10 blocks on one GPU against local transformers
on the same GPU, and a SmolLM2-shaped model in float32 for exactness.

    python benchmarks/gpu.py | tee gpu.jsonl               # on a machine with a GPU (see README, "GPU")
    python benchmarks/gpu.py --small --device cpu          # the same script on small shapes, on a CPU

What it does, all on ``--device``:

1. Writes a random checkpoint with Llama-2-13B shapes (hidden 5120, 40 layers) in bfloat16, drawing the
   numbers on the device (seconds on a GPU), into --work-dir.
2. Local transformers: load time, time to first token and decode tokens/s of a greedy --new-tokens
   generation, and the logits of the prompt.
3. The swarm: --servers servers of equal spans on the same device, started by ``LocalSwarm`` (a real DHT,
   real gRPC servers in processes of their own), a ``ShardedModel`` client with its head on the device.
   Load time (first process start to every server online), GPU memory per server, TTFT and tokens/s,
   then the greedy agreement with local (tokens equal, and the first position that differs) and the
   largest difference between the two runs' prompt logits.
4. A SmolLM2-135M-shaped model (random weights: the real one cannot travel to a machine with no index)
   in float32, 3 servers: its tokens must equal local transformers' exactly.

One JSON line per result; the last line is a summary with the decode ratio (swarm / local).
``--small`` shrinks every shape so the whole script runs on a CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import time
from pathlib import Path

import harness
import shaped_checkpoint
import torch

logger = logging.getLogger("benchmarks.gpu")
GREEDY = dict(do_sample=False, eos_token_id=None)
SMOLLM2_135M = dict(  # HuggingFaceTB/SmolLM2-135M-Instruct's shape
    hidden_size=576,
    num_hidden_layers=30,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
SMALL_13B = dict(shaped_checkpoint.LLAMA_2_13B, hidden_size=256, intermediate_size=688, num_attention_heads=8)
SMALL_13B.update(num_key_value_heads=8, num_hidden_layers=8, vocab_size=1024)
SMALL_SMOL = dict(SMOLLM2_135M, num_hidden_layers=6, vocab_size=2048)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="where servers and client compute (default cuda)")
    parser.add_argument("--small", action="store_true", help="small shapes, for a CPU run of the script")
    parser.add_argument("--servers", type=int, default=4, help="servers of the 13B-shaped model")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--work-dir", type=Path, default=Path("/tmp/shardnet-gpu"), help="checkpoints go here"
    )
    parser.add_argument("--skip-smollm2", action="store_true")
    harness.add_run_args(parser)
    return parser.parse_args()


def smollm2_shaped(folder: Path, small: bool) -> Path:
    """A random float32 Llama of SmolLM2-135M's shape (tied embeddings), saved once with save_pretrained."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(SMALL_SMOL if small else SMOLLM2_135M)))
    with torch.no_grad():  # random init gives near-uniform logits; spread them so greedy picks are not ties
        model.get_input_embeddings().weight.mul_(4.0)
    model.save_pretrained(folder)
    return folder


def gpu_used_bytes(device: torch.device) -> int:
    """Memory in use on the device, by every process (0 on a CPU)."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def server_gpu_bytes(pids: list[int], device: torch.device) -> dict[int, int]:
    """GPU memory of each server process, from NVML where the driver tells it (empty where it does not)."""
    if device.type != "cuda":
        return {}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        used = {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    except Exception as exc:  # no NVML, or a sandbox that hides processes: the total is reported instead
        logger.info("no per-process GPU memory (%s)", exc)
        return {}
    return {pid: int(used[pid]) for pid in pids if used.get(pid)}


def timed_generate(generate, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict]:
    clock = harness.TokenClock()
    tokens = generate(ids, new_tokens, clock)
    summary = clock.summary()
    return tokens, {
        "ttft_ms": harness.ms(summary["ttft_s"]),
        "tokens_per_s": round(1.0 / summary["decode_step_s"], 2),
        "decode_step_ms": harness.ms(summary["decode_step_s"]),
    }


def run_local(path: Path, ids: torch.Tensor, dtype: torch.dtype, device: torch.device, new_tokens: int):
    from transformers import AutoModelForCausalLM

    began = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    load_s = time.perf_counter() - began
    ids = ids.to(device)

    def generate(prompt, new, streamer):
        with torch.inference_mode():
            return model.generate(prompt, max_new_tokens=new, streamer=streamer, **GREEDY)

    generate(ids, 4, None)  # warm-up
    tokens, speed = timed_generate(generate, ids, new_tokens)
    with torch.inference_mode():
        logits = model(ids).logits.float().cpu()
    fields = dict(kind="local", load_s=round(load_s, 2), gpu_mib=harness.mib(gpu_used_bytes(device)), **speed)
    model = None  # the GPU memory back before the swarm starts
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return fields, tokens.cpu(), logits


def run_swarm(path: Path, ids: torch.Tensor, dtype: torch.dtype, device: torch.device, servers: int, args):
    from shardnet import ShardedModel
    from shardnet.launch import LocalSwarm, even_spans

    spans = even_spans(harness.num_blocks(path), servers)
    dtype_name = str(dtype).removeprefix("torch.")
    before = gpu_used_bytes(device)
    swarm = LocalSwarm(
        path,
        spans,
        dtype=dtype_name,
        log_dir=harness.swarm_log_dir(args.log_dir, f"gpu-{path.name}"),
        torch_threads=args.server_threads,
        extra_args=["--device", str(device)],
    )
    began = time.perf_counter()
    try:
        swarm.start(timeout_s=900)
        load_s = time.perf_counter() - began
        used = gpu_used_bytes(device) - before
        per_server = server_gpu_bytes([p.pid for p in swarm.servers], device)
        with ShardedModel.from_pretrained(
            path, initial_peers=swarm.initial_peers, dtype=dtype, device=str(device)
        ) as model:

            def generate(prompt, new, streamer):
                with model.inference_session(max_length=prompt.shape[1] + new):
                    return model.generate(prompt.to(device), max_new_tokens=new, streamer=streamer, **GREEDY)

            generate(ids, 4, None)  # warm-up
            tokens, speed = timed_generate(generate, ids, args.new_tokens)
            with torch.inference_mode():
                logits = model(ids.to(device)).logits.float().cpu()
    finally:
        swarm.stop()
    fields = dict(
        kind="swarm",
        servers=servers,
        spans=harness.span_names(spans),
        load_s=round(load_s, 2),
        gpu_mib_all_servers=harness.mib(used),
        gpu_mib_per_server=(
            [harness.mib(v) for v in per_server.values()] if per_server else harness.mib(used / servers)
        ),
        **speed,
    )
    return fields, tokens.cpu(), logits


def agreement(swarm_tokens: torch.Tensor, local_tokens: torch.Tensor, prompt_len: int) -> dict:
    got, want = swarm_tokens[0, prompt_len:], local_tokens[0, prompt_len:]
    differ = (got != want).nonzero()
    return {
        "tokens_equal": int((got == want).sum()),
        "tokens_compared": int(want.numel()),
        "first_difference": int(differ[0]) if len(differ) else None,
    }


def compare(name: str, path: Path, dtype: torch.dtype, servers: int, args, common: dict) -> dict:
    """Local, then the swarm, on the same prompt; emits both lines and returns the swarm's."""
    device = torch.device(args.device)
    from shardnet.models import load_config

    ids = harness.random_prompt(load_config(path).vocab_size, 1, args.prompt_len, seed=0)
    local, local_tokens, local_logits = run_local(path, ids, dtype, device, args.new_tokens)
    record = dict(common, model=name, dtype=str(dtype).removeprefix("torch."))
    harness.emit(harness.record("gpu", **record, **local))
    swarm, swarm_tokens, swarm_logits = run_swarm(path, ids, dtype, device, servers, args)
    line = harness.record(
        "gpu",
        **record,
        **swarm,
        **agreement(swarm_tokens, local_tokens, ids.shape[1]),
        max_logit_diff=float((swarm_logits - local_logits).abs().max()),
        logit_scale=float(local_logits.abs().max()),
        decode_ratio=round(swarm["tokens_per_s"] / local["tokens_per_s"], 3),
        ttft_ratio=round(swarm["ttft_ms"] / local["ttft_ms"], 3),
    )
    harness.emit(line)
    return line


def main() -> None:
    args = parse_args()
    harness.setup(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu (with --small) to try the script")
    common = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", small=args.small
    )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    with harness.time_limit(args.time_limit_s):
        big = args.work_dir / ("llama13b-small" if args.small else "llama13b")
        began = time.perf_counter()
        shape = SMALL_13B if args.small else shaped_checkpoint.LLAMA_2_13B
        shaped_checkpoint.write_shaped_checkpoint(
            big, shape, torch.bfloat16, device="cuda" if device.type == "cuda" else "cpu", head_std=1.0
        )
        logger.info("13B-shaped checkpoint ready in %.1fs", time.perf_counter() - began)
        lines.append(compare("llama-13b-shape", big, torch.bfloat16, args.servers, args, common))
        if not args.small:
            shutil.rmtree(big, ignore_errors=True)  # 26 GB of disk back
        if not args.skip_smollm2:
            smol = smollm2_shaped(args.work_dir / ("smollm2-small" if args.small else "smollm2"), args.small)
            lines.append(compare("smollm2-135m-shape", smol, torch.float32, 3, args, common))
    summary = dict(
        common,
        decode_ratio_13b=lines[0]["decode_ratio"],
        ttft_ratio_13b=lines[0]["ttft_ratio"],
        greedy_agreement_13b=f"{lines[0]['tokens_equal']}/{lines[0]['tokens_compared']}",
        max_logit_diff_13b=lines[0]["max_logit_diff"],
    )
    if len(lines) > 1:
        summary["smollm2_fp32_tokens_exact"] = lines[1]["tokens_equal"] == lines[1]["tokens_compared"]
        summary["smollm2_fp32_max_logit_diff"] = lines[1]["max_logit_diff"]
    harness.emit(harness.record("gpu.summary", **summary))


if __name__ == "__main__":
    main()
