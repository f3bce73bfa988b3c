"""A per-client request rate: a token bucket per client, refilled at ``per_s`` up to ``burst``.

It counts the calls that cost a server work without being paced by its compute: ``Info``, ``Forward``
and session opens. Steps are not counted: a session's steps arrive one at a time on its stream and
each waits for the compute, so a session cannot flood a server with them. A refused call gets
RESOURCE_EXHAUSTED (``ClientQuotaError``) with the time to wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from shardnet.errors import ClientQuotaError

_PRUNE_EVERY = 1024  # admissions between sweeps of the buckets of clients gone quiet


class RequestRate:
    def __init__(self, per_s: float, burst: float, clock: Callable[[], float] = time.monotonic):
        if per_s <= 0 or burst < 1:
            raise ValueError(f"need per_s > 0 and burst >= 1, got {per_s}, {burst}")
        self.per_s = per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when counted)
        self._admitted = 0
        self._lock = threading.Lock()

    def admit(self, client: str, what: str) -> None:
        """Count one call of ``client``; raise ClientQuotaError if its bucket is empty."""
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.per_s)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                wait_s = (1 - tokens) / self.per_s
                raise ClientQuotaError(
                    f"{what}: this client is over its request rate ({self.per_s:g}/s, bursts of "
                    f"{self.burst:g}; --max-requests-per-s); retry in {wait_s:.2f}s"
                )
            self._buckets[client] = (tokens - 1, now)
            self._admitted += 1
            if self._admitted % _PRUNE_EVERY == 0:
                self._prune(now)

    def _prune(self, now: float) -> None:
        """Forget clients whose bucket has refilled: they are indistinguishable from new ones."""
        full_after_s = self.burst / self.per_s
        self._buckets = {
            client: (tokens, then)
            for client, (tokens, then) in self._buckets.items()
            if now - then < full_after_s
        }

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)
