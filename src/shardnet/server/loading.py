"""Loading and freeing a span: its weights (quantized as asked) wrapped in a ``SpanBackend``, and giving
all of that back (the headroom policy's rest, a move) so the memory really returns to the device.

Loading and the probes run on the compute thread, as every forward pass does (``server/compute_queue.py``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import weakref
from dataclasses import dataclass
from functools import partial

import torch
from transformers import PretrainedConfig

from shardnet.devices import HOST
from shardnet.models import Checkpoint
from shardnet.models.base import ModelAdapter
from shardnet.models.quantization import quantize_span
from shardnet.server.adapters import ServerAdapters
from shardnet.server.backend import SpanBackend, SpanLimits
from shardnet.server.compute_queue import ComputeQueue
from shardnet.server.config import ServerConfig
from shardnet.server.prefix_reuse import PrefixStore
from shardnet.server.weight_identity import span_digests

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Freed:
    """What giving a span back released."""

    weight_bytes: int  # the span's parameters and buffers, as loaded
    collected: bool  # nothing referred to the span any more after the collection: its tensors are gone


@dataclass
class SpanLoader:
    config: ServerConfig
    adapter: ModelAdapter
    checkpoint: Checkpoint
    model_config: PretrainedConfig
    model_id: str
    dtype: torch.dtype
    device: torch.device
    max_length: int  # longest session, positions (--max-length capped by the model)
    max_position: int  # the model's max_position_embeddings
    compute: ComputeQueue
    threads_chosen: bool = False  # the lone-step thread count is chosen once, at the first load

    async def load(self, span: tuple[int, int]) -> tuple[SpanBackend, list[str], float]:
        """The span's backend, the digest of each block's weights (announced), and its probed steps/s."""
        backend, digests = await asyncio.to_thread(self.compute.run, partial(self._build, span))
        if self.device == HOST and not self.threads_chosen:  # all cores for a lone step only where faster
            most = await asyncio.to_thread(
                self.compute.run, partial(self.compute.threads.choose_most, backend.decode_step_runner)
            )
            self.compute.inline_when_idle = most == 1  # no OpenMP team: a lone step needs no hand-off
            self.threads_chosen = True
            logger.info("compute threads: %d for a lone step, 1 while loaded", most)
        throughput = await asyncio.to_thread(self.compute.run, backend.probe_throughput)
        return backend, digests, throughput

    def _build(self, span: tuple[int, int]) -> tuple[SpanBackend, list[str]]:
        start, end = span
        cfg = self.config
        blocks = self.adapter.load_span(
            self.checkpoint, self.model_config, start, end, self.dtype, self.device
        )
        # Right after loading, layer by layer: the peak is the span in --dtype, never the whole model.
        quantize_span(blocks, cfg.quant, self.device)
        digests = span_digests(blocks.blocks)  # announced: status tells weights that differ
        adapters = None
        if cfg.adapters:  # after the digests: those name the base weights every holder shares
            adapters = ServerAdapters(blocks.blocks, start, end, list(cfg.adapters), self.dtype, self.device)
        limits = SpanLimits(
            model_id=self.model_id,
            start=start,
            end=end,
            hidden_size=int(self.model_config.hidden_size),
            max_batch_size=cfg.max_batch_size,
            max_length=self.max_length,
            max_position=self.max_position,
        )
        backend = SpanBackend(
            blocks,
            self.dtype,
            limits,
            cfg.max_chunk_tokens,
            self.device,
            batching=cfg.batching,
            compute=self.compute,
            prefix=PrefixStore(cfg.prefix_tokens, shared=cfg.share_prefix_cache),
            adapters=adapters,
        )
        return backend, digests

    def release(self, held: Held) -> Freed:
        """Collect what the span held once every reference to it is gone (sessions closed,
        ``runtime.backend`` cleared, the caller's own dropped), and hand the memory back."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the caching allocator keeps freed blocks for itself otherwise
        _trim_host_heap()
        return Freed(held.weight_bytes, held.span() is None)


@dataclass(frozen=True)
class Held:
    """A loaded span, seen from outside: its size, and a weak reference that tells when it is gone."""

    weight_bytes: int
    span: weakref.ref

    @classmethod
    def of(cls, backend: SpanBackend) -> Held:
        tensors = [*backend.span.parameters(), *backend.span.buffers()]
        return cls(sum(t.numel() * t.element_size() for t in tensors), weakref.ref(backend.span))


def _trim_host_heap() -> None:
    """Ask glibc to give freed heap pages back to the system (else RSS stays as high as it was)."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim there
        pass
