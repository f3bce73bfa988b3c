"""FairLock: a lock granted in arrival order, so compute is shared chunk by chunk between sessions.

Python's ``threading.Lock`` is not fair: a thread that releases it and at once asks again usually gets
it back before a thread that has been waiting. A long prefill that takes the lock once per chunk would
then still hold every other session's decode step for its whole duration. Here a release hands the lock
straight to the longest waiter, so a decode step waits for at most one chunk.
"""

from __future__ import annotations

import threading
from collections import deque


class FairLock:
    def __init__(self) -> None:
        self._mutex = threading.Lock()  # guards _held and _waiters; held only for a few instructions
        self._held = False
        self._waiters: deque[threading.Lock] = deque()  # one locked gate per waiting thread, oldest first

    def acquire(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            gate = threading.Lock()
            gate.acquire()
            self._waiters.append(gate)
        gate.acquire()  # released by the holder's release(), which hands the lock over to us

    def release(self) -> None:
        with self._mutex:
            if not self._held:
                raise RuntimeError("release of an unheld FairLock")
            if self._waiters:
                self._waiters.popleft().release()  # still held: ownership passes to the oldest waiter
            else:
                self._held = False

    @property
    def waiting(self) -> int:
        """Threads waiting for the lock now."""
        with self._mutex:
            return len(self._waiters)

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
