"""Keeps this server's record on the DHT fresh: re-announces every third of its lifetime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import hivemind

from shardnet.dht import ServerRecord, announce

logger = logging.getLogger(__name__)


class Announcer:
    def __init__(
        self, dht: hivemind.DHT, model_id: str, make_record: Callable[[], ServerRecord], ttl_s: float
    ):
        self.dht = dht
        self.model_id = model_id
        self.make_record = make_record
        self.ttl_s = ttl_s
        self._task: asyncio.Task | None = None

    async def announce_now(self) -> None:
        record = self.make_record()
        try:
            await asyncio.to_thread(announce, self.dht, self.model_id, record, self.ttl_s)
            logger.debug("announced state=%s span=%d:%d", record.state, record.start, record.end)
        except Exception as exc:  # a DHT hiccup must not take the server down; the next refresh retries
            logger.warning("DHT announce failed (will retry): %s", exc)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            await self.announce_now()
