"""Inference sessions and the KV-cache budget they draw on. No gRPC here."""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field

import torch

from shardnet.errors import CacheFullError, InvalidRequestError

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """One client's stream: its span, limits, KV cache and the padding mask of every cached position."""

    session_id: str
    start: int  # first block run (absolute index)
    end: int  # one past the last block run
    batch_size: int
    max_length: int  # most positions this session may hold
    cache: object  # the adapter's KV cache for this span
    position: int = 0  # positions already in the cache
    attention_mask: torch.Tensor | None = None  # [batch, position] 0/1, kept only once padding was sent
    steps: int = 0
    compute_s: float = field(default=0.0)

    @property
    def cache_tokens(self) -> int:
        return self.batch_size * self.max_length

    @property
    def short_id(self) -> str:
        return self.session_id[:8]


class SessionTable:
    """Open sessions and the cache budget; thread-safe, since gRPC handlers and compute run apart."""

    def __init__(self, max_cache_tokens: int, max_sessions: int):
        self.max_cache_tokens = max_cache_tokens
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @property
    def cache_tokens_used(self) -> int:
        with self._lock:
            return sum(s.cache_tokens for s in self._sessions.values())

    @property
    def cache_tokens_free(self) -> int:
        return self.max_cache_tokens - self.cache_tokens_used

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(
        self, start: int, end: int, batch_size: int, max_length: int, cache: object, client_id: str
    ) -> Session:
        tokens = batch_size * max_length
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise CacheFullError(
                    f"server has {self.max_sessions} sessions open, its limit; try another server"
                )
            used = sum(s.cache_tokens for s in self._sessions.values())
            if used + tokens > self.max_cache_tokens:
                raise CacheFullError(
                    f"session needs {tokens} cache tokens (batch {batch_size} x length {max_length}) "
                    f"but only {self.max_cache_tokens - used} of {self.max_cache_tokens} are free"
                )
            session_id = _clean_client_id(client_id) or uuid.uuid4().hex
            while session_id in self._sessions:
                session_id = uuid.uuid4().hex
            session = Session(session_id, start, end, batch_size, max_length, cache)
            self._sessions[session_id] = session
        logger.info(
            "session open session=%s span=%d:%d batch=%d max_length=%d",
            session.short_id,
            start,
            end,
            batch_size,
            max_length,
        )
        return session

    def close(self, session: Session) -> None:
        with self._lock:
            removed = self._sessions.pop(session.session_id, None)
        if removed is not None:
            removed.cache = None  # drop the KV tensors now, not when the handler's frame goes
            logger.info(
                "session close session=%s steps=%d positions=%d compute=%.3fs",
                session.short_id,
                session.steps,
                session.position,
                session.compute_s,
            )


def _clean_client_id(client_id: str) -> str:
    if not client_id:
        return ""
    if len(client_id) > 64 or not client_id.replace("-", "").isalnum():
        raise InvalidRequestError("session_id must be at most 64 letters, digits or dashes")
    return client_id
