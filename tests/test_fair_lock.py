"""FairLock grants the lock in arrival order, even to a holder that releases and asks again at once."""

from __future__ import annotations

import threading
import time

import pytest

from shardnet.server.fair_lock import FairLock


def _wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.001)


def _queue_waiters(lock: FairLock, count: int, order: list[int]) -> list[threading.Thread]:
    """Start ``count`` threads that each take the lock once, in a known arrival order."""

    def take(index: int) -> None:
        with lock:
            order.append(index)

    threads = []
    for index in range(count):
        thread = threading.Thread(target=take, args=(index,))
        thread.start()
        _wait_until(lambda index=index: lock.waiting == index + 1)  # queued before the next one starts
        threads.append(thread)
    return threads


def test_waiters_get_the_lock_in_arrival_order():
    lock, order = FairLock(), []
    lock.acquire()
    threads = _queue_waiters(lock, 5, order)
    lock.release()
    for thread in threads:
        thread.join(timeout=30)
    assert order == [0, 1, 2, 3, 4]
    assert lock.waiting == 0


def test_a_holder_that_asks_again_queues_behind_the_waiter():
    lock, order = FairLock(), []
    lock.acquire()  # a long step, chunk 1
    [waiter] = _queue_waiters(lock, 1, order)  # a decode step arrives
    again = threading.Thread(target=lambda: (lock.acquire(), order.append("chunk 2"), lock.release()))
    lock.release()  # chunk 1 done ...
    again.start()  # ... and the long step asks for chunk 2 right away
    waiter.join(timeout=30)
    again.join(timeout=30)
    assert order == [0, "chunk 2"]


def test_release_of_unheld_lock_raises():
    with pytest.raises(RuntimeError):
        FairLock().release()
