"""ComputeQueue: a server's compute, granted in arrival order, with alike decode steps run as one batch.

Compute is serial: one forward pass uses all of torch's threads. Callers queue for it in arrival order,
and a release hands it straight to the longest waiter (Python's ``threading.Lock`` is not fair: a thread
that releases it and at once asks again usually gets it back first, so a long prefill taken chunk by
chunk would hold every other session's decode step for its whole duration; here a decode step waits for
at most one chunk).

Decode steps of different sessions can share one forward pass. A caller that gets the compute takes
with it every waiting caller of the same batch key (same span, one new position each), up to a number
of rows, and runs them all at once; those callers wake up with their results without ever holding the
compute. Nobody waits to fill a batch: a batch is whatever queued while the compute was busy, so a lone
session runs exactly as before.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any


class _Waiter:
    """One caller in the queue. ``gate`` is locked until the caller may go on."""

    __slots__ = ("gate", "key", "item", "rows", "served", "result", "error")

    def __init__(self, key: Hashable | None, item: Any, rows: int):
        self.gate = threading.Lock()
        self.key = key  # None: never batched
        self.item = item
        self.rows = rows
        self.served = False  # True: run in another caller's batch; result or error is set
        self.result: Any = None
        self.error: BaseException | None = None


class ComputeQueue:
    def __init__(self, max_batch_rows: int):
        self.max_batch_rows = max_batch_rows  # most rows (sessions' batch sizes summed) in one batch
        self._mutex = threading.Lock()  # guards the fields below; held only for a few instructions
        self._held = False
        self._waiters: deque[_Waiter] = deque()  # oldest first
        self.batches_run = 0  # batches of two or more callers
        self.steps_batched = 0  # callers served in those batches

    @property
    def waiting(self) -> int:
        """Callers waiting for the compute now."""
        with self._mutex:
            return len(self._waiters)

    def run(self, work: Callable[[], Any]) -> Any:
        """``work()`` alone on the compute, after everything that asked before."""
        self._acquire(_Waiter(None, None, 0))
        try:
            return work()
        finally:
            self._release()

    def run_batched(
        self, key: Hashable, item: Any, rows: int, run_many: Callable[[list[Any]], Sequence[Any]]
    ) -> Any:
        """This caller's result of ``run_many([item, ...])``, run with the items of waiting callers of the
        same ``key`` (as many as fit in ``max_batch_rows``), or in a batch another caller runs. An error
        of the batch is every member's error."""
        me = _Waiter(key, item, rows)
        if not self._acquire(me):
            if me.error is not None:
                raise me.error
            return me.result
        batch = [me, *self._take_alike(me)]
        try:
            results = run_many([waiter.item for waiter in batch])
            for waiter, result in zip(batch[1:], results[1:], strict=True):
                waiter.result = result
            return results[0]
        except BaseException as error:
            for waiter in batch[1:]:
                waiter.error = error
            raise
        finally:
            if len(batch) > 1:
                self.batches_run += 1
                self.steps_batched += len(batch)
            for waiter in batch[1:]:
                waiter.served = True
                waiter.gate.release()
            self._release()

    def _acquire(self, me: _Waiter) -> bool:
        """Wait for the compute. True: this caller holds it; False: it was served in another's batch."""
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            me.gate.acquire()
            self._waiters.append(me)
        me.gate.acquire()  # released by a release() handing the compute over, or by a batch that served us
        return not me.served

    def _release(self) -> None:
        with self._mutex:
            if not self._held:
                raise RuntimeError("release of compute that is not held")
            if self._waiters:
                self._waiters.popleft().gate.release()  # still held: it passes to the oldest waiter
            else:
                self._held = False

    def _take_alike(self, me: _Waiter) -> list[_Waiter]:
        """Waiting callers of ``me``'s key, oldest first, while their rows fit; they leave the queue."""
        taken: list[_Waiter] = []
        rows = me.rows
        with self._mutex:
            kept: deque[_Waiter] = deque()
            for waiter in self._waiters:
                if waiter.key == me.key and rows + waiter.rows <= self.max_batch_rows:
                    taken.append(waiter)
                    rows += waiter.rows
                else:
                    kept.append(waiter)
            self._waiters = kept
        return taken
