"""Keeps this server's record on the DHT fresh: re-announces every third of its lifetime, and soon after
its load (free cache, open sessions) changed by a lot, so routing clients see it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import hivemind

from shardnet.dht import ServerRecord, announce

logger = logging.getLogger(__name__)
_LOAD_SHARE = 0.1  # a load change of a tenth of the server's capacity is worth an announcement


@dataclass(frozen=True)
class LoadTrigger:
    """When a load change is announced before the next periodic refresh."""

    cache_tokens: int  # free cache moved by at least this many tokens since the last announcement
    sessions: int  # or open sessions changed by at least this many
    min_interval_s: float = 1.0  # and never sooner than this after the previous announcement

    @classmethod
    def for_limits(cls, max_cache_tokens: int, max_sessions: int) -> LoadTrigger:
        return cls(
            cache_tokens=max(1, round(_LOAD_SHARE * max_cache_tokens)),
            sessions=max(1, round(_LOAD_SHARE * max_sessions)),
        )

    def moved(self, last: ServerRecord, now: ServerRecord) -> bool:
        return (
            abs(now.cache_tokens_free - last.cache_tokens_free) >= self.cache_tokens
            or abs(now.open_sessions - last.open_sessions) >= self.sessions
        )


class Announcer:
    def __init__(
        self,
        dht: hivemind.DHT,
        model_id: str,
        make_record: Callable[[], ServerRecord],
        ttl_s: float,
        trigger: LoadTrigger | None = None,
    ):
        self.dht = dht
        self.model_id = model_id
        self.make_record = make_record
        self.ttl_s = ttl_s
        self.trigger = trigger
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._last: ServerRecord | None = None  # what the DHT holds now, as far as we know
        self._last_at = 0.0  # monotonic time of the last announcement

    async def announce_now(self) -> None:
        record = self.make_record()
        self._last, self._last_at = record, time.monotonic()
        try:
            await asyncio.to_thread(announce, self.dht, self.model_id, record, self.ttl_s)
            logger.debug(
                "announced state=%s span=%d:%d open_sessions=%d cache_free=%d",
                record.state,
                record.start,
                record.end,
                record.open_sessions,
                record.cache_tokens_free,
            )
        except Exception as exc:  # a DHT hiccup must not take the server down; the next refresh retries
            logger.warning("DHT announce failed (will retry): %s", exc)

    async def announce_record(self, record: ServerRecord) -> None:
        """Store a record other than the current one, under its own span's blocks: a move's destination
        claimed in advance, or the OFFLINE that clears a span left behind."""
        try:
            await asyncio.to_thread(announce, self.dht, self.model_id, record, self.ttl_s)
        except Exception as exc:  # as announce_now: the records expire on their own
            logger.warning("DHT announce of blocks %d:%d failed: %s", record.start, record.end, exc)

    def load_changed(self) -> None:
        """Thread-safe (gRPC handler threads call it when a session opens or closes): wake the refresher,
        which re-announces if the load moved enough since the last announcement."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._refresh_forever())

    async def stop(self) -> None:
        self._loop = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _refresh_forever(self) -> None:
        while True:
            await self._wait_for_reason()
            await self.announce_now()

    async def _wait_for_reason(self) -> None:
        """Return when the periodic refresh is due, or when the load moved enough (rate-limited)."""
        wake = self._wake
        while True:
            due = self._last_at + self.ttl_s / 3 - time.monotonic()
            if due <= 0:
                return
            try:
                await asyncio.wait_for(wake.wait(), timeout=due)
            except asyncio.TimeoutError:  # not the builtin on Python 3.10
                return
            wake.clear()
            if self.trigger is not None and self._moved():
                pause = self._last_at + self.trigger.min_interval_s - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)  # changes meanwhile are in the record made after this
                return

    def _moved(self) -> bool:
        return self._last is None or self.trigger.moved(self._last, self.make_record())
