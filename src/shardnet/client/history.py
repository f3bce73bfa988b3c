"""GrowingBuffer: what a session sent, kept so it can be replayed to a replacement server.

A buffer holds a [batch, length, ...] tensor that grows along dim 1. Its storage doubles when full, so
appending one position per decode step is amortized O(1) instead of re-copying the whole history, and
it never grows past the session's ``max_length``: history is bounded by the session, not by time.
"""

from __future__ import annotations

import torch

from shardnet.errors import GenerationError


class GrowingBuffer:
    def __init__(self, capacity: int, initial: int = 64):
        self.capacity = capacity  # most positions it will ever hold (the session's max_length)
        self._initial = initial
        self._data: torch.Tensor | None = None  # [batch, allocated, ...]
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, chunk: torch.Tensor) -> None:
        """Append ``chunk`` [batch, new, ...] after the positions already held."""
        new = chunk.shape[1]
        needed = self.length + new
        if needed > self.capacity:
            raise GenerationError(f"history of {needed} positions exceeds the session's {self.capacity}")
        if self._data is None or needed > self._data.shape[1]:
            allocated = min(max(needed, 2 * self.length, self._initial), self.capacity)
            grown = chunk.new_empty((chunk.shape[0], allocated, *chunk.shape[2:]))
            if self._data is not None:
                grown[:, : self.length] = self._data[:, : self.length]
            self._data = grown
        self._data[:, self.length : needed] = chunk
        self.length = needed

    def view(self) -> torch.Tensor:
        """The positions held, [batch, length, ...] (a view: copy it before keeping it past an append)."""
        if self._data is None:
            raise GenerationError("the history is empty")
        return self._data[:, : self.length]

    def with_tail(self, tail: torch.Tensor) -> torch.Tensor:
        """Every position held followed by ``tail`` [batch, new, ...], as a new tensor."""
        if self.length == 0:
            return tail
        return torch.cat([self.view(), tail], dim=1)

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (a rollback)."""
        self.length = min(self.length, length)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes old row ``rows[i]`` ([batch] int64), as the servers' caches are reordered."""
        if self._data is not None:
            self._data = self._data[rows.to(self._data.device)]
