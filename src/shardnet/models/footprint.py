"""How much memory a span needs, from the checkpoint's safetensors headers and the model config only.

Nothing here reads a weight: a server asks before loading whether its span fits on its device. Block
weights are found by their key, ``...layers.N.``, ``...h.N.`` or ``...blocks.N.`` (the layouts of
transformers' decoder models: Llama and its relatives, GPT-2, Falcon, BLOOM, GPT-NeoX).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from transformers import PretrainedConfig

from shardnet.errors import ModelLoadError
from shardnet.models.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint

_BLOCK_KEY = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # safetensors' floating dtype codes
_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2}
_ITEM_BYTES |= {"I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER_BYTES = 100 << 20  # safetensors refuses larger headers too


def block_of(key: str) -> int | None:
    """The block a weight belongs to ('model.layers.7.mlp.up_proj.weight' -> 7), or None."""
    match = _BLOCK_KEY.search(key)
    return int(match.group(1)) if match else None


def _weight_files(checkpoint: Checkpoint, start: int, end: int) -> list[Path]:
    """The files that hold blocks start:end: from the index of a sharded checkpoint (other shards may be
    absent, as when only a span's shards were downloaded), or the single file."""
    index = checkpoint.folder / INDEX_FILE
    if not index.is_file():
        return [checkpoint.folder / SINGLE_FILE]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index} is not a safetensors index: {exc}") from exc
    names = set()
    for key, name in weight_map.items():
        block = block_of(key)
        if block is not None and start <= block < end:
            names.add(name)
    return [checkpoint.folder / name for name in sorted(names)]


def read_header(file: Path) -> dict[str, dict]:
    """A safetensors file's header: tensor name -> {"dtype", "shape", "data_offsets"}. Reads only the
    header (8 bytes of length, then JSON), never maps the file: a big shard costs nothing to ask."""
    try:
        with open(file, "rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            if length > _MAX_HEADER_BYTES:
                raise ModelLoadError(f"{file} has a {length}-byte safetensors header, larger than allowed")
            header = json.loads(stream.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read the safetensors header of {str(file)!r}: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file} does not have a safetensors header")
    header.pop("__metadata__", None)
    return header


def block_weight_bytes(checkpoint: Checkpoint, start: int, end: int, dtype: torch.dtype) -> list[int]:
    """Bytes of the weights of each block start..end-1 once loaded in ``dtype`` (floating tensors are cast
    to it, others keep theirs, as ``Checkpoint.read`` does), from the safetensors headers only."""
    sizes = [0] * (end - start)
    for file in _weight_files(checkpoint, start, end):
        for key, info in read_header(file).items():
            block = block_of(key)
            if block is None or not start <= block < end:
                continue
            try:
                code, numel = info["dtype"], torch.Size(info["shape"]).numel()
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelLoadError(f"{file}: tensor {key!r} has a malformed header entry") from exc
            item = dtype.itemsize if code in _FLOAT_CODES else _ITEM_BYTES.get(code, 8)
            sizes[block - start] += numel * item
    return sizes


def kv_bytes_per_token(config: PretrainedConfig, blocks: int, dtype: torch.dtype) -> int:
    """KV-cache bytes one position of one sequence takes in ``blocks`` blocks: keys and values of every
    KV head, 2 x kv_heads x head_dim x blocks x dtype size."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    return 2 * kv_heads * head_dim * blocks * dtype.itemsize
