"""Conversation: what one ``model.inference_session()`` has seen, so later calls continue it.

Inside the session, ``generate()`` and ``forward()`` take the new tokens only (the API users have
code on). The conversation keeps every token and its padding mask and hands transformers the whole
sequence with the session's ``RemoteCache``, so a later call is exactly one local ``generate()`` over
the concatenation: transformers sends only what the servers do not hold yet (the last generated
token stays pending until the next call). A call whose rows do not match the cache's (beam search
leaves its cache in beam order; ``num_return_sequences`` widens the batch) gets a fresh cache, and
the whole conversation is sent again.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from shardnet.client.remote_cache import RemoteCache
from shardnet.client.routing import RouteHop
from shardnet.client.session import InferenceSession
from shardnet.client.timings import StepTiming
from shardnet.errors import GenerationError
from shardnet.models.hf_compat import cache_kwargs

logger = logging.getLogger(__name__)


class Conversation:
    def __init__(
        self,
        open_chain: Callable[[int, int], InferenceSession],
        max_length: int,
        generation_config: GenerationConfig,
    ):
        self._open_chain = open_chain
        self.generation_config = generation_config  # the model's defaults, which a call's kwargs update
        self.max_length = max_length
        self.ids: torch.Tensor | None = None  # [batch, seen] every token so far, sent or pending
        self.mask: torch.Tensor | None = None  # [batch, seen] 0/1 padding mask of those tokens
        self.step_timings: list[StepTiming] = []  # per step, where each hop's time went
        self.cache = self._new_cache()
        self.closed = False

    def _new_cache(self) -> RemoteCache:
        return RemoteCache(self._open_chain, self.max_length, timings=self.step_timings)

    @property
    def chain(self) -> InferenceSession | None:
        return self.cache.chain

    @property
    def route(self) -> list[RouteHop]:
        """The servers this conversation runs on now (empty before its first step)."""
        return self.cache.route

    @property
    def batch_size(self) -> int | None:
        return None if self.ids is None else self.ids.shape[0]

    def _extend(self, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole conversation followed by ``ids`` [batch, new], and its mask (not recorded yet)."""
        if self.closed:
            raise GenerationError("this inference session is closed")
        mask = torch.ones_like(ids) if mask is None else mask.to(ids.device, torch.long)
        if self.ids is None:
            return ids, mask
        if ids.shape[0] != self.ids.shape[0]:
            raise GenerationError(
                f"this inference session has batch size {self.ids.shape[0]}, got {ids.shape[0]}"
            )
        return torch.cat([self.ids, ids], dim=1), torch.cat([self.mask, mask], dim=1)

    def _check_room(self, needed: int, seen: int, new: int) -> None:
        if needed > self.max_length:
            raise GenerationError(
                f"the inference session holds at most {self.max_length} positions; this call needs {needed} "
                f"({seen} already, {new} more): open it with a larger max_length"
            )

    def _cache_for(self, batch: int) -> RemoteCache:
        """The session's cache if its rows are the conversation's at this batch size, else a fresh one."""
        if self.cache.chain is not None and self.cache.batch_size != batch:
            logger.info("session cache rows do not match this call: sending the conversation again")
            self.cache.close()
            self.cache = self._new_cache()
        return self.cache

    def forward(self, model_forward: Callable, ids: torch.Tensor, mask: torch.Tensor | None):
        """Logits of ``ids`` (the new tokens), after every pending token."""
        full_ids, full_mask = self._extend(ids, mask)
        self._check_room(full_ids.shape[1], full_ids.shape[1] - ids.shape[1], ids.shape[1])
        cache = self._cache_for(full_ids.shape[0])
        send = full_ids.shape[1] - cache.get_seq_length()
        positions = generation_positions(full_mask)[:, -send:]  # as generate() numbers them
        out = model_forward(
            full_ids[:, -send:], attention_mask=full_mask, position_ids=positions, cache=cache
        )
        self.ids, self.mask = full_ids, full_mask
        out.logits = out.logits[:, -ids.shape[1] :]
        return out

    def generate(
        self,
        model_generate: Callable,
        config: GenerationConfig | None,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        kwargs: dict,
    ):
        """transformers' generate over the whole conversation; returns ``ids`` followed by the new tokens."""
        full_ids, full_mask = self._extend(ids, mask)
        resolved = copy.deepcopy(config if config is not None else self.generation_config)
        resolved.update(**{k: v for k, v in kwargs.items() if hasattr(resolved, k)})
        new = resolved.max_new_tokens
        if new is None:
            new = max(int(resolved.max_length or 20) - full_ids.shape[1], 0)
        self._check_room(full_ids.shape[1] + new, full_ids.shape[1] - ids.shape[1], ids.shape[1] + new)
        beams = int(resolved.num_beams or 1)
        rows = beams if beams > 1 else int(resolved.num_return_sequences or 1)
        cache = self._cache_for(full_ids.shape[0] * rows)
        out = model_generate(
            full_ids, generation_config=config, attention_mask=full_mask, **cache_kwargs(cache), **kwargs
        )
        sequences = out.sequences if isinstance(out, ModelOutput) else out
        seen = self.ids.shape[1] if self.ids is not None else 0
        expanded = full_mask.repeat_interleave(sequences.shape[0] // full_mask.shape[0], dim=0)
        added = torch.ones_like(sequences[:, full_mask.shape[1] :])
        self.ids, self.mask = sequences, torch.cat([expanded, added], dim=1)
        if beams > 1:  # the cache's rows are the last step's beams, not the returned sequences
            self.cache.close()
            self.cache = self._new_cache()
        if isinstance(out, ModelOutput):
            out.sequences = sequences[:, seen:]
            return out
        return sequences[:, seen:]

    def close(self) -> None:
        self.cache.close()
        self.closed = True


def generation_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate() makes them: real tokens counted from 0, padding at 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
