"""A random Llama checkpoint of a given shape, written as sharded safetensors one shard at a time.

Never holds more than one block in memory, so a 13B-shaped (26 GB bf16) checkpoint can be made on a
small machine. Shard ``i+1`` holds block ``i``; the last shard holds embeddings, final norm and LM head.
The index always describes every shard; ``blocks`` limits which block shards are actually written
(the others are simply absent), for when the disk cannot hold them all.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

logger = logging.getLogger("benchmarks.shaped_checkpoint")

LLAMA_2_13B = dict(
    num_hidden_layers=40,
    hidden_size=5120,
    intermediate_size=13824,
    num_attention_heads=40,
    num_key_value_heads=40,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def block_shapes(config: LlamaConfig, block: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of one Llama block."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    prefix = f"model.layers.{block}."
    return {
        prefix + "self_attn.q_proj.weight": (hidden, hidden),
        prefix + "self_attn.k_proj.weight": (kv, hidden),
        prefix + "self_attn.v_proj.weight": (kv, hidden),
        prefix + "self_attn.o_proj.weight": (hidden, hidden),
        prefix + "mlp.gate_proj.weight": (inter, hidden),
        prefix + "mlp.up_proj.weight": (inter, hidden),
        prefix + "mlp.down_proj.weight": (hidden, inter),
        prefix + "input_layernorm.weight": (hidden,),
        prefix + "post_attention_layernorm.weight": (hidden,),
    }


def head_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    return {
        "model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
        "model.norm.weight": (config.hidden_size,),
        "lm_head.weight": (config.vocab_size, config.hidden_size),
    }


def shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def random_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator, std: float = 0.02
) -> torch.Tensor:
    """Norm weights are ones; matrices are normal * ``std``, drawn in row chunks to bound float32 scratch
    (on the generator's device, so a GPU draws a 13B-shaped checkpoint in seconds; returned on the host)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    rows_per_chunk = max(1, (64 << 20) // (4 * shape[1]))  # <= 64 MiB of float32 at a time
    for row in range(0, shape[0], rows_per_chunk):
        chunk = out[row : row + rows_per_chunk]
        drawn = torch.randn(chunk.shape, generator=generator, device=generator.device).mul_(std)
        chunk.copy_(drawn.to(dtype))
    return out


def shard_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    return sum(torch.Size(s).numel() for s in shapes.values()) * dtype.itemsize


def shard_shapes(config: LlamaConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shard file name -> its tensors' names and shapes, for every shard of the checkpoint."""
    total = config.num_hidden_layers + 1
    shards = {shard_name(i + 1, total): block_shapes(config, i) for i in range(config.num_hidden_layers)}
    shards[shard_name(total, total)] = head_shapes(config)
    return shards


def checkpoint_bytes(shape: dict, dtype: torch.dtype) -> int:
    return sum(shard_bytes(s, dtype) for s in shard_shapes(LlamaConfig(**shape)).values())


def write_shaped_checkpoint(
    folder: Path,
    shape: dict,
    dtype: torch.dtype,
    blocks: Iterable[int] | None = None,
    device: str = "cpu",
    head_std: float = 0.02,
) -> dict:
    """Write config, index and the shards not already there; returns what is on disk. ``device``: where
    the random numbers are drawn; ``head_std``: the LM head's spread (larger: fewer near-ties in greedy
    choices, for comparing two runs' tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(dtype=str(dtype).removeprefix("torch."), **shape)
    layers = config.num_hidden_layers
    total = layers + 1
    shards = shard_shapes(config)
    wanted = set(range(layers)) if blocks is None else set(blocks)
    config.to_json_file(folder / "config.json")
    index = {
        "metadata": {"total_size": sum(shard_bytes(s, dtype) for s in shards.values())},
        "weight_map": {key: name for name, shapes in shards.items() for key in shapes},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for number, (name, shapes) in enumerate(shards.items(), start=1):
        is_head = number == total
        if (not is_head and number - 1 not in wanted) or (is_head and blocks is not None):
            continue
        if (folder / name).is_file():
            continue
        generator = torch.Generator(device=device).manual_seed(number)
        tensors = {
            key: random_tensor(s, dtype, generator, head_std if key == "lm_head.weight" else 0.02)
            for key, s in shapes.items()
        }
        partial = folder / (name + ".partial")
        save_file(tensors, partial, metadata={"format": "pt"})
        os.replace(partial, folder / name)
        logger.info("wrote %s (%.0f MiB)", name, shard_bytes(shapes, dtype) / (1 << 20))
        del tensors
    present = [name for name in shards if (folder / name).is_file()]
    return {
        "total_bytes": index["metadata"]["total_size"],
        "shards_total": total,
        "shards_present": len(present),
        "bytes_present": sum(shard_bytes(shards[name], dtype) for name in present),
    }
