"""Per-request deadlines on long-lived gRPC streams.

A session's stream stays open for as long as the conversation (possibly hours), so it carries no gRPC
deadline; instead every step gets one. gRPC's blocking stream iterator has no per-message timeout, so
one watchdog thread per process cancels the call of any step that is not answered in time; the
stream then raises, and the session treats that server as failed. Arming and disarming cost a lock
and a dict update, nothing more, on the per-token path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class StepDeadlines:
    """Calls ``on_expire`` for every armed key whose deadline passes before it is disarmed."""

    _shared: StepDeadlines | None = None
    _shared_lock = threading.Lock()

    def __init__(self, tick_s: float = 0.05):
        self.tick_s = tick_s  # how often the watchdog looks while something is armed: the timeouts' precision
        self._armed: dict[object, tuple[float, Callable[[], None]]] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    @classmethod
    def shared(cls) -> StepDeadlines:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def arm(self, key: object, timeout_s: float, on_expire: Callable[[], None]) -> None:
        with self._wake:
            was_idle = not self._armed
            self._armed[key] = (time.monotonic() + timeout_s, on_expire)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="shardnet-deadlines", daemon=True)
                self._thread.start()
            elif was_idle:
                self._wake.notify()

    def disarm(self, key: object) -> None:
        with self._wake:
            self._armed.pop(key, None)

    def _watch(self) -> None:
        while True:
            with self._wake:
                self._wake.wait(timeout=self.tick_s if self._armed else None)
                now = time.monotonic()
                expired = [key for key, (deadline, _) in self._armed.items() if deadline <= now]
                callbacks = [self._armed.pop(key)[1] for key in expired]
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # a watchdog that dies would leave every later step without a deadline
                    logger.exception("deadline callback failed")
