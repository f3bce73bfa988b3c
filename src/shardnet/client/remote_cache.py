"""RemoteCache: the servers' KV caches of one generation, as transformers' ``generate()`` sees them.

It is a ``transformers.Cache`` holding no tensors: the keys and values live on the servers of an
``InferenceSession``, opened at the first forward (when the batch size is known). What generation
asks of a cache is carried out there: ``get_seq_length`` is the positions the servers hold,
``reorder_cache`` (beam search) and ``crop`` (assisted decoding's rollback of rejected draft tokens)
change the servers' caches with the session's next step and the client's replay history at once, so
a failover after either rebuilds exactly the cache the generation expects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from shardnet.client.routing import RouteHop
from shardnet.client.session import InferenceSession
from shardnet.client.timings import StepTiming
from shardnet.errors import GenerationError
from shardnet.models.hf_compat import TensorlessCache

logger = logging.getLogger(__name__)


class RemoteCache(TensorlessCache):
    def __init__(
        self,
        open_chain: Callable[[int, int], InferenceSession],
        max_length: int | None = None,
        timings: list[StepTiming] | None = None,
    ):
        super().__init__()
        self._open_chain = open_chain
        self.max_length = max_length  # positions the servers reserve; set by generate() when None
        self.chain: InferenceSession | None = None
        self.padded = False  # whether padding was ever sent (then every later step sends its mask)
        self.closed = False
        self.step_timings = [] if timings is None else timings  # per step, where each hop's time went

    # ---- what transformers asks of a cache ----

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.chain.position if self.chain is not None else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.max_length is None else self.max_length

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_initialized(self) -> bool:
        return self.chain is not None

    @property
    def batch_size(self) -> int:
        return self.chain.batch_size if self.chain is not None else -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues old row ``beam_idx[i]`` (servers, with the next step; history, now)."""
        if self.chain is not None:
            self.chain.reorder(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (transformers' convention; a positive value is the
        length to keep, as in older versions)."""
        length = self.get_seq_length()
        keep = length + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, length)
        if keep < length:
            self.chain.crop(max(keep, 0))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise GenerationError("a RemoteCache cannot change its batch size; start a new generation instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise GenerationError("a RemoteCache cannot change its batch size; start a new generation instead")

    def reset(self) -> None:
        """Forget everything: the next step opens a fresh session."""
        self.close()
        self.closed = False

    def update(self, *args, **kwargs):
        raise GenerationError("a RemoteCache is filled by the servers; it takes no local key/value states")

    # ---- stepping ----

    def reserve(self, max_length: int) -> None:
        """Make sure the servers will hold ``max_length`` positions (before the session opens)."""
        if self.max_length is None and self.chain is None:
            self.max_length = max_length
        elif self.max_length is not None and max_length > self.max_length:
            raise GenerationError(
                f"this generation needs {max_length} positions but the cache holds at most {self.max_length}: "
                "open the inference session with a larger max_length"
            )

    def step(self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Run [batch, new, hidden] through the servers; ``mask`` [batch, new] (or None), ``positions`` too."""
        if self.closed:
            raise GenerationError("this cache's session is closed")
        if self.chain is None:
            if self.max_length is None:
                raise GenerationError("RemoteCache: max_length is unknown; pass it when creating the cache")
            self.chain = self._open_chain(hidden.shape[0], self.max_length)
        elif hidden.shape[0] != self.chain.batch_size:
            raise GenerationError(
                f"this cache holds batch size {self.chain.batch_size}, got a step of batch size {hidden.shape[0]}"
            )
        if mask is not None and bool((mask == 0).any()):
            self.padded = True
        out = self.chain.step(hidden, mask if self.padded else None, positions)
        self.step_timings.append(self.chain.last_timing)
        return out

    @property
    def route(self) -> list[RouteHop]:
        """The servers the session runs on now (empty before its first step)."""
        return self.chain.route if self.chain is not None else []

    def close(self) -> None:
        """Free the servers' caches now (also done when the cache is garbage-collected)."""
        if self.chain is not None:
            self.chain.close()
            self.chain = None
        self.closed = True

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the servers reclaim idle sessions anyway
            pass

    def __repr__(self) -> str:
        return f"RemoteCache(positions={self.get_seq_length()}, route={[str(hop) for hop in self.route]})"
