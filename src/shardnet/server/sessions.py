"""Inference sessions, the KV-cache budget they draw on, and their counts. No gRPC here."""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shardnet.errors import CacheFullError, ClientQuotaError, InvalidRequestError, SessionError

logger = logging.getLogger(__name__)


def _no_cancel() -> None:
    pass


@dataclass
class Session:
    """One client's stream: its span, limits, KV cache and the padding mask of every cached position."""

    session_id: str
    start: int  # first block run (absolute index)
    end: int  # one past the last block run
    batch_size: int
    max_length: int  # most positions this session may hold
    cache: object  # the adapter's KV cache for this span
    cancel: Callable[[], None] = _no_cancel  # ends the session's stream from another thread (idle reclaim)
    position: int = 0  # positions already in the cache
    attention_mask: torch.Tensor | None = None  # [batch, position] 0/1, kept only once padding was sent
    steps: int = 0
    compute_s: float = field(default=0.0)
    last_active_s: float = field(default_factory=time.monotonic)  # monotonic time its last step ended
    busy: bool = False  # a step is being run (or waits for compute) now
    reclaimed: bool = False  # closed for idleness: takes no more steps
    push_token: bytes = field(default_factory=lambda: secrets.token_bytes(16))  # names it to pushing servers
    inbox: queue.SimpleQueue = field(
        default_factory=queue.SimpleQueue
    )  # (arrived: perf_counter, pb.PushRequest) pushed here
    client: str = ""  # who opened it (its connection), for the per-client quotas
    adapter: str = ""  # the LoRA adapter its steps run with (server/adapters.py); "" = the base model

    @property
    def cache_tokens(self) -> int:
        return self.batch_size * self.max_length

    @property
    def short_id(self) -> str:
        return self.session_id[:8]


class SessionTable:
    """Open sessions and the cache budget; thread-safe, since gRPC handlers and compute run apart.

    Besides the server-wide limits, each client (see ``ShardServicer``: one connection) may hold at most
    ``max_sessions_per_client`` sessions and ``max_cache_tokens_per_client`` cache tokens, so one client
    cannot take all of a server's cache.

    ``on_change`` (if set) is called after every open and close, outside the table's lock, on the
    thread that opened or closed the session.
    """

    def __init__(
        self,
        max_cache_tokens: int,
        max_sessions: int,
        max_cache_tokens_per_client: int | None = None,
        max_sessions_per_client: int | None = None,
    ):
        self.max_cache_tokens = max_cache_tokens
        self.max_sessions = max_sessions
        self.max_cache_tokens_per_client = max_cache_tokens_per_client or max_cache_tokens
        self.max_sessions_per_client = max_sessions_per_client or max_sessions
        self.on_change: Callable[[], None] | None = None
        self._sessions: dict[str, Session] = {}
        self._by_token: dict[bytes, Session] = {}
        self._adoptable: dict[bytes, Session] = {}  # adoption token -> a handed-over session, not claimed yet
        self._served = 0
        self._lock = threading.Lock()

    @property
    def cache_tokens_used(self) -> int:
        with self._lock:
            return sum(s.cache_tokens for s in self._sessions.values())

    @property
    def cache_tokens_free(self) -> int:
        return self.max_cache_tokens - self.cache_tokens_used

    @property
    def sessions_served(self) -> int:
        """Sessions opened since the server started (open now included)."""
        with self._lock:
            return self._served

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(
        self,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        cache: object,
        client_id: str,
        cancel: Callable[[], None] = _no_cancel,
        client: str = "",
        adapter: str = "",
    ) -> Session:
        """``client_id``: the session id the client asked for; ``client``: who asks (its connection);
        ``adapter``: the LoRA adapter its steps run with ("" = none)."""
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
            own = [s for s in self._sessions.values() if s.client == client]
            if len(own) >= self.max_sessions_per_client:
                raise ClientQuotaError(
                    f"this client has {len(own)} sessions open here, its limit "
                    f"(--max-sessions-per-client {self.max_sessions_per_client}); close one or try another server"
                )
            own_tokens = sum(s.cache_tokens for s in own)
            if own_tokens + tokens > self.max_cache_tokens_per_client:
                raise ClientQuotaError(
                    f"session needs {tokens} cache tokens but this client already holds {own_tokens} of its "
                    f"{self.max_cache_tokens_per_client} (--max-cache-tokens-per-client); try another server"
                )
            session_id = _clean_client_id(client_id) or uuid.uuid4().hex
            while session_id in self._sessions:
                session_id = uuid.uuid4().hex
            session = Session(
                session_id, start, end, batch_size, max_length, cache, cancel, client=client, adapter=adapter
            )
            self._sessions[session_id] = session
            self._by_token[session.push_token] = session
            self._served += 1
        logger.info(
            "session open session=%s span=%d:%d batch=%d max_length=%d",
            session.short_id,
            start,
            end,
            batch_size,
            max_length,
        )
        self._changed()
        return session

    def close(self, session: Session) -> None:
        with self._lock:
            removed = self._sessions.pop(session.session_id, None)
            self._by_token.pop(session.push_token, None)
        if removed is not None:
            removed.cache = None  # drop the KV tensors now, not when the handler's frame goes
            removed.attention_mask = None
            logger.info(
                "session close session=%s steps=%d positions=%d compute=%.3fs",
                session.short_id,
                session.steps,
                session.position,
                session.compute_s,
            )
            self._changed()

    def hold_for_adoption(self, session: Session, claim_s: float) -> bytes:
        """Keep a session another server handed over until its client claims it with the returned token;
        closed if nobody does within ``claim_s``."""
        token = secrets.token_bytes(16)
        session.cancel = lambda: self.close(session)
        with self._lock:
            self._adoptable[token] = session
        timer = threading.Timer(claim_s, self._unclaimed, args=(token,))
        timer.daemon = True
        timer.start()
        return token

    def _unclaimed(self, token: bytes) -> None:
        with self._lock:
            session = self._adoptable.pop(token, None)
        if session is not None:
            logger.info("closing handed-over session=%s: its client never came", session.short_id)
            self.close(session)

    def claim(self, token: bytes, cancel: Callable[[], None], client: str) -> Session:
        """The handed-over session ``token`` names, now its client's (its stream ends it)."""
        with self._lock:
            session = self._adoptable.pop(token, None)
            if session is None or session.session_id not in self._sessions:
                raise SessionError("no session was handed over here with that token (or it expired)")
            session.cancel, session.client = cancel, client
            session.last_active_s = time.monotonic()
        return session

    def pushed_to(self, push_token: bytes) -> Session:
        """The open session a pushing server names by its token."""
        with self._lock:
            session = self._by_token.get(push_token)
        if session is None or session.reclaimed:
            raise SessionError("push to a session that is not open here (closed, reclaimed or never opened)")
        return session

    def begin_step(self, session: Session) -> None:
        """Mark a session busy (never reclaimed while busy); refused once it was reclaimed."""
        with self._lock:
            if session.reclaimed:
                raise SessionError(f"session {session.short_id} was closed after being idle too long")
            session.busy = True

    def end_step(self, session: Session) -> None:
        with self._lock:
            session.busy = False
            session.last_active_s = time.monotonic()

    def take_idle(self, idle_timeout_s: float) -> list[Session]:
        """Sessions with no step for ``idle_timeout_s`` seconds, marked reclaimed: the caller cancels them."""
        now = time.monotonic()
        idle = []
        with self._lock:
            for session in self._sessions.values():
                if (
                    not session.busy
                    and not session.reclaimed
                    and now - session.last_active_s >= idle_timeout_s
                ):
                    session.reclaimed = True
                    idle.append(session)
        return idle

    def _changed(self) -> None:
        callback = self.on_change
        if callback is not None:
            callback()


def _clean_client_id(client_id: str) -> str:
    if not client_id:
        return ""
    if len(client_id) > 64 or not client_id.replace("-", "").isalnum():
        raise InvalidRequestError("session_id must be at most 64 letters, digits or dashes")
    return client_id
