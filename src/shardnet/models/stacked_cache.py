"""A cache that stands for several sessions' caches during one batched decode step.

Sessions hold caches of different lengths. For one forward pass over all their rows, every layer of the
span shows attention one left-padded key/value frame: each session's positions right-aligned, zeros to
their left, hidden by the padding mask the backend builds in the same frame. A layer's ``update``
appends the new position to each session's own cache layer (which keeps its own rules: a sliding
window drops what falls out of it) and lays what that returns into the frame. The frame exists only
while its layer's attention runs, so a batch costs one layer's worth of extra memory at a time.

Query and key distances are the same in the frame as in each session's own positions (both are
right-aligned at the new position), so causal and sliding-window masks come out right per row.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


class StackedLayer(DynamicLayer):
    def __init__(self, parts: list[tuple[CacheLayerMixin, slice]], frame: int):
        super().__init__()
        self.parts = parts  # each session's own layer and its rows in the batch
        self.frame = frame  # positions before this step in the frame: the longest session's
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.frame

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.frame + query_length, 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, new, _ = key_states.shape  # [batch, kv heads, new, head dim]
        length = self.frame + new
        keys = key_states.new_zeros(batch, heads, length, key_states.shape[-1])
        values = value_states.new_zeros(batch, heads, length, value_states.shape[-1])
        for layer, rows in self.parts:
            own_keys, own_values = layer.update(key_states[rows], value_states[rows], *args, **kwargs)
            keys[rows, :, length - own_keys.shape[-2] :] = own_keys
            values[rows, :, length - own_values.shape[-2] :] = own_values
        return keys, values


def stacked_cache(caches: list[Cache], batch_sizes: list[int], start: int, end: int, frame: int) -> Cache:
    """Layers ``start:end`` of ``caches`` (sessions' caches of one model) seen as one batch; the other
    layers are empty and never run."""
    bounds, first = [], 0
    for size in batch_sizes:
        bounds.append(slice(first, first + size))
        first += size
    layers: list[CacheLayerMixin] = [DynamicLayer() for _ in range(len(caches[0].layers))]
    for index in range(start, end):
        layers[index] = StackedLayer(
            [(cache.layers[index], rows) for cache, rows in zip(caches, bounds, strict=True)], frame
        )
    return Cache(layers=layers)
