"""IdleReaper: closes sessions that had no step for too long, so a forgotten session frees its cache.

A session's handler thread is blocked reading the client's next request; the reaper cancels that
stream (the session's ``cancel``), the read fails, and the handler's ``finally`` frees the session.
A client whose process died needs no reaper: its connection closes and the stream ends at once
(half-open connections are found by gRPC keepalive, see ``ServerConfig``).
"""

from __future__ import annotations

import asyncio
import logging

from shardnet.server.sessions import SessionTable

logger = logging.getLogger(__name__)
_MAX_CHECK_INTERVAL_S = 5.0


class IdleReaper:
    def __init__(self, sessions: SessionTable, idle_timeout_s: float):
        self.sessions = sessions
        self.idle_timeout_s = idle_timeout_s
        self.check_interval_s = min(idle_timeout_s / 4, _MAX_CHECK_INTERVAL_S)
        self._task: asyncio.Task | None = None

    def reap(self) -> int:
        """Cancel every idle session's stream now; returns how many."""
        idle = self.sessions.take_idle(self.idle_timeout_s)
        for session in idle:
            logger.info(
                "session idle for %.0fs, closing session=%s steps=%d",
                self.idle_timeout_s,
                session.short_id,
                session.steps,
            )
            try:
                session.cancel()
            except Exception as exc:  # the stream may be ending already; its handler frees the session
                logger.debug("cancelling idle session=%s: %s", session.short_id, exc)
        return len(idle)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._reap_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            self.reap()
