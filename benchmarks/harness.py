"""What every benchmark script shares: model resolution, JSON records, timing, RSS and plot helpers.

Records go to stdout as one JSON line each; logs go to stderr. Nothing here starts a swarm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import signal
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy
import process_env  # noqa: F401  (before torch and hivemind: shardnet's environment defaults)
import psutil
import torch
import transformers
from platformdirs import user_cache_dir

import shardnet

logger = logging.getLogger("benchmarks")

CACHE_DIR = Path(user_cache_dir("shardnet"))
# Random-init Llama shapes; "tiny" is the same model servers/local_swarm.py --tiny makes.
RANDOM_MODELS = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=8,
        intermediate_size=688,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
    ),
    "mid": dict(
        hidden_size=1024,
        num_hidden_layers=16,
        intermediate_size=2752,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
}
MODEL_CHOICES = "smollm2 | tiny | mid | random:KEY=VALUE,... | PATH"


# ---- command line and logging ----


def add_common_args(parser: argparse.ArgumentParser, default_model: str = "tiny") -> None:
    parser.add_argument("--model", default=default_model, help=f"{MODEL_CHOICES} (default {default_model})")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_run_args(parser)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Threads, plot, logs and the time limit: flags every script takes."""
    parser.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="torch threads per server process; default: each server chooses from its load "
        "(server/compute_threads.py: all cores alone, one while loaded)",
    )
    parser.add_argument(
        "--client-threads",
        type=int,
        default=None,
        help="torch threads of this process (local transformers and the swarm client); default torch's",
    )
    parser.add_argument("--plot", type=Path, default=None, help="also draw the figures into this PNG")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep server/DHT logs here")
    parser.add_argument(
        "--time-limit-s", type=float, default=3600.0, help="abort (and stop the swarm) after this long"
    )


def threads_label(threads: int | None) -> int | str:
    """A thread count as the JSON lines record it: ``auto`` where the server chooses."""
    return "auto" if threads is None else threads


def setup(args: argparse.Namespace) -> None:
    """Logs to stderr; this process's torch threads from --client-threads."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.client_threads:
        torch.set_num_threads(args.client_threads)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise in the main thread after ``seconds`` or on SIGTERM, so finally-blocks stop the swarm.

    The servers run in sessions of their own (no Ctrl-C, no group kill reaches them): only our
    ``LocalSwarm.stop()`` ends them, so this process must never die without running it.
    """

    def expire(*_: object) -> None:
        raise TimeoutError(f"benchmark ran past --time-limit-s {seconds:.0f}")

    def terminate(*_: object) -> None:
        raise SystemExit("benchmark stopped by SIGTERM")

    previous = signal.signal(signal.SIGALRM, expire), signal.signal(signal.SIGTERM, terminate)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def swarm_log_dir(root: Path | None, name: str) -> Path | None:
    """A fresh sub-folder of --log-dir for one swarm, so swarms do not overwrite each other's logs."""
    if root is None:
        return None
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---- models ----


def resolve_model(name: str) -> Path:
    """``smollm2`` (the embedded demo model), ``tiny``/``mid`` (random, made once), or a folder path."""
    if name == "smollm2":
        from shardnet.errors import ShardnetError
        from shardnet.models.demo_model import ensure_demo_model  # lazy: converts on first use

        try:
            return Path(ensure_demo_model())
        except ShardnetError as exc:
            raise SystemExit(f"--model smollm2: {exc}") from None
    if name in RANDOM_MODELS:
        return random_llama(CACHE_DIR / f"bench-{name}", RANDOM_MODELS[name])
    if name.startswith("random:"):
        shape = random_shape(name.removeprefix("random:"))
        label = "-".join(f"{key}{value}" for key, value in sorted(shape.items()))
        return random_llama(CACHE_DIR / f"bench-random-{label}", shape)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name!r}: not one of {MODEL_CHOICES} and no config.json there")
    return path


def random_shape(text: str) -> dict:
    """``hidden_size=512,num_hidden_layers=4`` on top of the tiny shape: any LlamaConfig int field."""
    from transformers import LlamaConfig

    known = LlamaConfig().to_dict()
    shape = dict(RANDOM_MODELS["tiny"])
    for item in filter(None, text.split(",")):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in known or not value.isdigit():
            raise SystemExit(f"--model random:{text}: {item!r} is not LLAMA_CONFIG_FIELD=INTEGER")
        shape[key] = int(value)
    return shape


def random_llama(folder: Path, shape: dict) -> Path:
    """A random-init float32 Llama saved with save_pretrained (safetensors), created once."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    logger.info("creating random Llama %s in %s", shape, folder)
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **shape)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init gives near-uniform logits; spread them so greedy picks are not ties
        model.get_output_embeddings().weight.mul_(8.0)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    partial.rename(folder)
    return folder


def num_blocks(model_path: Path) -> int:
    from shardnet.models import load_config

    return int(load_config(model_path).num_hidden_layers)


def random_prompt(vocab_size: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 3 else 0  # skip the usual special ids
    return torch.randint(low, vocab_size, (batch, length), generator=generator)  # [batch, seq]


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


# ---- records ----


def versions() -> dict:
    return {
        "shardnet": shardnet.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def record(bench: str, **fields: object) -> dict:
    """A result with the bench name first and the versions and client threads last."""
    return {
        "bench": bench,
        **fields,
        "client_torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def span_names(spans: Sequence[tuple[int, int]]) -> list[str]:
    return [f"{start}:{end}" for start, end in spans]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in 0..100."""
    return float(numpy.percentile(values, q))


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# ---- timing ----


class TokenClock:
    """A generate() streamer that stamps each step: put(prompt) first, then put(tokens) per new token."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stamps: list[float] = []  # one per new-token step
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def summary(self) -> dict:
        """TTFT, inter-token latencies and the decode-phase step time, in seconds."""
        gaps = [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]
        return {
            "ttft_s": self.stamps[0] - self.started,
            "gaps_s": gaps,
            "decode_step_s": (self.stamps[-1] - self.stamps[0]) / max(len(gaps), 1),
        }


# ---- memory ----


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def tree_pss_bytes(pid: int) -> tuple[int, list[str]]:
    """Proportional set size of a process and every process under it (shared pages split between the
    processes sharing them, so the sum counts each page once), and those processes' names."""
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    return sum(process.memory_full_info().pss for process in tree), [process.name() for process in tree]


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the highest resident set size the process ever had (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def mib(n_bytes: float) -> float:
    return round(n_bytes / (1 << 20), 1)


# ---- plots ----


def new_figure(columns: int, width_in: float = 6.0, height_in: float = 4.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=(width_in * columns, height_in), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("plot written to %s", path)
