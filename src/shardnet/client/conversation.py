"""Conversation: what one inference session has seen (tokens, padding, positions) over a server chain.

``model.inference_session()`` yields one; generate() and forward() extend it. It keeps the token
history so that a later generate() continues the same sequence, exactly as one local generate() over
the concatenation would (same positions, same repetition-penalty context).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from shardnet.client.hop_stream import HopTiming
from shardnet.client.routing import RouteHop
from shardnet.client.session import InferenceSession
from shardnet.errors import GenerationError
from shardnet.models import ClientHead

logger = logging.getLogger(__name__)


class Conversation:
    def __init__(
        self,
        open_chain: Callable[[int, int], InferenceSession],
        head: ClientHead,
        max_length: int,
        dtype: torch.dtype,
    ):
        self._open_chain = open_chain
        self.head = head
        self.max_length = max_length
        self.dtype = dtype
        self.chain: InferenceSession | None = None
        self.batch_size: int | None = None
        self.ids = torch.empty(0, 0, dtype=torch.long)  # [batch, seen] every token fed, then pending ones
        self.mask = torch.empty(0, 0, dtype=torch.long)  # [batch, seen] 0/1 padding mask of those tokens
        self.sent = 0  # positions already on the servers; ids[:, sent:] are pending
        self.real_sent = torch.zeros(0, dtype=torch.long)  # [batch] non-padding tokens already on the servers
        self.padded = False  # whether any padding was ever sent (then the servers need the mask)
        self.closed = False
        self.step_timings: list[list[HopTiming]] = []  # per flush, where each hop's time went

    @property
    def route(self) -> list[RouteHop]:
        """The servers this conversation runs on now (empty before its first step)."""
        return self.chain.route if self.chain is not None else []

    @property
    def pending(self) -> torch.Tensor:
        return self.ids[:, self.sent :]  # [batch, pending]

    def check_room(self, batch_size: int, new_positions: int) -> None:
        if self.closed:
            raise GenerationError("this inference session is closed")
        if self.batch_size is not None and batch_size != self.batch_size:
            raise GenerationError(
                f"this inference session has batch size {self.batch_size}, got {batch_size}"
            )
        needed = self.ids.shape[1] + new_positions
        if needed > self.max_length:
            raise GenerationError(
                f"the inference session holds at most {self.max_length} positions; this call needs {needed} "
                f"({self.ids.shape[1]} already, {new_positions} more): open it with a larger max_length"
            )

    def append(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Record tokens [batch, new] (and their padding mask) without sending them yet."""
        if self.batch_size is None:
            self.batch_size = ids.shape[0]
            self.ids = self.ids.reshape(ids.shape[0], 0)
            self.mask = self.mask.reshape(ids.shape[0], 0)
            self.real_sent = torch.zeros(ids.shape[0], dtype=torch.long)
        mask = torch.ones_like(ids) if mask is None else mask.to(torch.long)
        self.ids = torch.cat([self.ids, ids.to(torch.long)], dim=1)
        self.mask = torch.cat([self.mask, mask], dim=1)

    def flush(self, last_only: bool) -> torch.Tensor:
        """Send every pending token through the chain; return logits [batch, pending or 1, vocab]."""
        new = self.ids.shape[1] - self.sent
        if new == 0:
            raise GenerationError("nothing to run: pass at least one token")
        if self.chain is None:
            self.chain = self._open_chain(self.batch_size, self.max_length)
        # transformers' generate() positions: count of real tokens so far, padding at 0. Counted from
        # real_sent, so a decode step costs the new tokens only, not the whole history.
        new_mask = self.mask[:, self.sent :]  # [batch, new]
        counts = self.real_sent[:, None] + new_mask.cumsum(-1)  # [batch, new]
        positions = (counts - 1).masked_fill(new_mask == 0, 0)
        self.padded = self.padded or bool((new_mask == 0).any())
        send_mask = new_mask if self.padded else None
        hidden = self.head.embed(self.pending, positions).to(self.dtype)  # [batch, new, hidden]
        hidden = self.chain.step(hidden, send_mask, positions)
        self.step_timings.append(self.chain.last_timings)
        self.sent = self.ids.shape[1]
        self.real_sent = counts[:, -1]
        if last_only:
            hidden = hidden[:, -1:]
        return self.head.logits(hidden)  # [batch, new or 1, vocab]

    def close(self) -> None:
        if self.chain is not None:
            self.chain.close()
            self.chain = None
        self.closed = True
