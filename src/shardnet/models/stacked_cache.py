"""A cache that stands for several sessions' caches during one batched decode step.

Sessions hold caches of different lengths. For one forward pass over all their rows, every layer of the
span shows attention one left-padded key/value frame: each session's positions right-aligned, zeros to
their left, hidden by the padding mask the backend builds in the same frame. A layer's ``update``
appends the new position to each session's own cache layer (which keeps its own rules: a sliding
window drops what falls out of it) and lays what that returns into the frame
(``hf_compat.StackedLayer``). The frame exists only while its layer's attention runs, so a batch costs
one layer's worth of extra memory at a time.

Query and key distances are the same in the frame as in each session's own positions (both are
right-aligned at the new position), so causal and sliding-window masks come out right per row.
"""

from __future__ import annotations

from shardnet.models import hf_compat


def stacked_cache(
    caches: list[hf_compat.Cache], batch_sizes: list[int], start: int, end: int, frame: int
) -> hf_compat.Cache:
    """Layers ``start:end`` of ``caches`` (sessions' caches of one model) seen as one batch; the other
    layers are empty and never run."""
    bounds, first = [], 0
    for size in batch_sizes:
        bounds.append(slice(first, first + size))
        first += size
    layers = [hf_compat.empty_layer() for _ in range(len(caches[0].layers))]
    for index in range(start, end):
        layers[index] = hf_compat.StackedLayer(
            [(cache.layers[index], rows) for cache, rows in zip(caches, bounds, strict=True)], frame
        )
    return hf_compat.layered_cache(layers)
