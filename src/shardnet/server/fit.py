"""Whether a span fits in its device's memory, checked before any weight is loaded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardnet.devices import dtype_name
from shardnet.errors import ConfigError

GIB = 1 << 30


@dataclass(frozen=True)
class SpanFootprint:
    """What a span needs on its device before it serves anyone."""

    blocks: tuple[int, int]  # the span, half-open
    weight_bytes: int  # its blocks' weights in the compute dtype
    cache_tokens: int  # positions of the minimum KV cache (one session, batch 1)
    cache_bytes: int  # bytes of that cache

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes


def check_fit(
    footprint: SpanFootprint, free_bytes: int, device: torch.device, dtype: torch.dtype, flag: str
) -> None:
    """ConfigError with the numbers (GiB) if the span's weights plus its minimum cache exceed ``free_bytes``."""
    if footprint.total_bytes <= free_bytes:
        return
    start, end = footprint.blocks
    where = "RAM" if device.type == "cpu" else "memory"
    raise ConfigError(
        f"{flag}: blocks {start}:{end} do not fit on {device}: {_size(footprint.weight_bytes)} of "
        f"{dtype_name(dtype)} weights + {_size(footprint.cache_bytes)} of KV cache for one session of "
        f"{footprint.cache_tokens} positions = {_size(footprint.total_bytes)}, but only "
        f"{_size(free_bytes)} of {where} is free; serve fewer blocks or use another --device or --dtype"
    )


def _size(nbytes: int) -> str:
    """'12.3 GiB', or MiB below a tenth of a GiB so small numbers do not read as 0.0."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB // 10 else f"{nbytes / (1 << 20):.1f} MiB"
