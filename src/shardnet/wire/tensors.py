"""torch tensors <-> ``shardnet.v1.Tensor`` messages: dtype name, shape, raw little-endian bytes."""

from __future__ import annotations

import math

import numpy as np
import torch

from shardnet.errors import InvalidRequestError, MessageTooLargeError
from shardnet.wire.v1 import shardnet_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16"})
# Bits of a float's exponent: all set means Inf or NaN. bfloat16 has no numpy dtype, so it is checked so.
_EXPONENT = {"float32": ("<u4", 0x7F800000), "float16": ("<u2", 0x7C00), "bfloat16": ("<u2", 0x7F80)}
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 40  # far beyond any message's bytes; keeps torch's stride arithmetic in int64


def serialize(tensor: torch.Tensor, max_bytes: int | None = None) -> pb.Tensor:
    """Encode a tensor; raise MessageTooLargeError if its bytes exceed ``max_bytes``."""
    name = DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise InvalidRequestError(f"dtype {tensor.dtype} cannot travel; use one of {sorted(DTYPES)}")
    flat = tensor.detach().cpu().contiguous()
    nbytes = flat.numel() * flat.element_size()
    if max_bytes is not None and nbytes > max_bytes:
        raise MessageTooLargeError(
            f"tensor of shape {list(tensor.shape)} is {nbytes} bytes, over the {max_bytes}-byte message limit"
        )
    # bfloat16 has no numpy dtype: reinterpret 2-byte elements as int16 to get at the raw bytes.
    raw = flat.view(torch.int16) if flat.dtype in (torch.bfloat16, torch.float16) else flat
    return pb.Tensor(dtype=name, shape=list(flat.shape), data=raw.numpy().tobytes())


def deserialize(message: pb.Tensor, allowed: frozenset[str] | None = None) -> torch.Tensor:
    """Decode a tensor, checking dtype, shape and byte count before touching the data."""
    dtype = DTYPES.get(message.dtype)
    if dtype is None or (allowed is not None and message.dtype not in allowed):
        raise InvalidRequestError(f"tensor dtype {message.dtype!r} is not accepted here")
    shape = list(message.shape)
    if len(shape) > MAX_DIMS or any(dim < 0 for dim in shape):
        raise InvalidRequestError(f"tensor shape {shape} is invalid")
    # Also with a zero among them, torch computes strides from the other dims: bound them all.
    if math.prod(max(dim, 1) for dim in shape) > MAX_ELEMENTS:
        raise InvalidRequestError(f"tensor shape {shape} is too large")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(message.data) != expected:
        raise InvalidRequestError(
            f"tensor of dtype {message.dtype} and shape {shape} needs {expected} bytes, got {len(message.data)}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray makes one writable copy, so torch owns its memory and never aliases the message.
    return torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(shape)


def check_finite(message: pb.Tensor, name: str) -> None:
    """Refuse (InvalidRequestError) a float tensor holding NaN or Inf; call it after ``deserialize``.

    It reads the raw bytes with numpy, on the calling thread alone: torch would start a thread team of
    its own on a gRPC thread for a large tensor, which slows the server's compute (``server/compute_queue.py``).
    """
    bits = _EXPONENT.get(message.dtype)
    if bits is None or not message.data:
        return
    dtype, exponent = bits
    raw = np.frombuffer(message.data, dtype=dtype)
    if np.any((raw & np.asarray(exponent, dtype=dtype)) == exponent):
        raise InvalidRequestError(f"{name} holds NaN or Inf values; send finite activations")
