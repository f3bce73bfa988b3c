"""Start a local swarm (one DHT node + N servers on 127.0.0.1) for a model folder, and keep it up.

    python servers/local_swarm.py --model ./llama --servers 3        # runs until Ctrl-C
    python servers/local_swarm.py --tiny --servers 2 --check         # tiny random model, generate, compare, stop

--check runs greedy generate through the swarm and through local transformers and says whether the
tokens are identical; this is the quickstart's main job until `shardnet demo` lands.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from platformdirs import user_cache_dir

from shardnet import ShardedModel
from shardnet.launch import LocalSwarm, even_spans
from shardnet.models import load_config


def tiny_model(folder: Path) -> Path:
    """A tiny random Llama (8 blocks, hidden 256), created once in the cache folder."""
    if (folder / "config.json").exists():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def check(swarm: LocalSwarm) -> bool:
    from transformers import AutoModelForCausalLM

    prompt = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with ShardedModel.from_pretrained(swarm.model_path, initial_peers=swarm.initial_peers) as model:
        route = " -> ".join(f"{hop.start}:{hop.end}@{hop.server.address}" for hop in model.route())
        began = time.perf_counter()
        ours = model.generate(prompt, max_new_tokens=32)
        elapsed = time.perf_counter() - began
    local = AutoModelForCausalLM.from_pretrained(swarm.model_path, dtype=torch.float32)
    theirs = local.generate(prompt, max_new_tokens=32, do_sample=False)
    same = ours.tolist() == theirs.tolist()
    print(f"route: {route}")
    print(
        f"swarm generated {ours.shape[1] - prompt.shape[1]} tokens in {elapsed:.2f}s: {ours[0, 12:].tolist()}"
    )
    print(f"identical to local transformers greedy generate: {same}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model folder (save_pretrained, safetensors)")
    source.add_argument(
        "--tiny", action="store_true", help="use a tiny random Llama made in the cache folder"
    )
    parser.add_argument("--servers", type=int, default=2, help="number of servers, spans split evenly")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--check", action="store_true", help="generate, compare with transformers, then stop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    model_path = args.model or tiny_model(Path(user_cache_dir("shardnet")) / "tiny-llama")
    num_blocks = int(load_config(model_path).num_hidden_layers)
    spans = even_spans(num_blocks, args.servers)
    with LocalSwarm(model_path, spans, dtype=args.dtype) as swarm:
        print(f"swarm up: model {swarm.model_id}, spans {spans}")
        print("initial peers:", *swarm.initial_peers)
        if args.check:
            return 0 if check(swarm) else 1
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print("Ctrl-C to stop")
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
