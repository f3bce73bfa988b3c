"""ComputeQueue: a server's compute, on one thread, in arrival order, with alike decode steps batched.

Every forward pass of a server runs on the queue's own thread, never on the gRPC thread that asked for
it. That is about speed, not only order: torch computes with OpenMP, and each thread that starts a
parallel region gets a team of worker threads of its own. Once a process holds more such threads than
it has cores, GNU OpenMP stops letting idle workers spin and puts them to sleep after every region, so
each of the hundreds of regions of a decode step waits for a wake-up. Measured on 2 cores: a mid-size
decode step took 36 ms on the loading thread and 52 ms on any later thread. So the weights are loaded,
the throughput probed and every step computed here, on one thread with one team. The exception: once
the server chose one torch thread (server/compute_threads.py), there is no team, and a step that finds
the compute idle runs on its caller's thread (``inline_when_idle``), saving a hand-off each way.

Callers queue in arrival order and the thread serves the oldest first, so a long prefill taken chunk by
chunk lets the decode steps that arrived meanwhile in between its chunks (a decode step waits for at most
one chunk). Decode steps of different sessions can share one forward pass: with the oldest waiting step,
the thread takes every waiting step of the same batch key (same span, one new position each), up to a
number of rows. Nobody waits to fill a batch: a batch is whatever queued while the compute was busy, so a
lone session runs as before.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from shardnet.server.compute_threads import ComputeThreads


class _Job:
    """One caller's request. ``done`` is locked until its result or error is set."""

    __slots__ = ("done", "key", "item", "rows", "run_many", "result", "error")

    def __init__(self, key: Hashable | None, item: Any, rows: int, run_many: Callable[[list[Any]], Sequence]):
        self.done = threading.Lock()
        self.done.acquire()
        self.key = key  # None: never batched
        self.item = item
        self.rows = rows
        self.run_many = run_many
        self.result: Any = None
        self.error: BaseException | None = None


def _run_alone(items: list[Callable[[], Any]]) -> list[Any]:
    [work] = items
    return [work()]


class ComputeQueue:
    def __init__(self, max_batch_rows: int, threads: ComputeThreads | None = None):
        self.max_batch_rows = max_batch_rows  # most rows (sessions' batch sizes summed) in one batch
        self.threads = threads  # sets torch's threads per batch from the load (None: leave them)
        # A step that finds the compute idle runs on its caller's thread, saving two thread hand-offs.
        # Only where torch computes on one thread: a caller's thread would otherwise start an OpenMP team
        # of its own (see above). The server turns it on once its probe chose one thread.
        self.inline_when_idle = False
        self._inline: threading.Thread | None = None  # the caller computing in place now
        self._busy = False  # the compute thread is running a batch
        self._ready = threading.Condition(threading.Lock())  # guards _jobs
        self._jobs: deque[_Job] = deque()  # waiting, oldest first
        self.batches_run = 0  # batches of two or more callers
        self.observe_batch: Callable[[int], None] | None = None  # told each batched pass's rows (metrics)
        self.steps_batched = 0  # callers served in those batches
        self._thread = threading.Thread(target=self._serve, name="compute", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Callers waiting for the compute now (not counting the one being served)."""
        with self._ready:
            return len(self._jobs)

    def run(self, work: Callable[[], Any]) -> Any:
        """``work()`` on the compute thread, alone, after everything that asked before."""
        return self._submit(_Job(None, work, 0, _run_alone))

    def run_batched(
        self, key: Hashable, item: Any, rows: int, run_many: Callable[[list[Any]], Sequence[Any]]
    ) -> Any:
        """This caller's result of ``run_many([..., item, ...])``, run on the compute thread with the items
        of other waiting callers of the same ``key`` (as many as fit in ``max_batch_rows``). An error of
        the batch is every member's error."""
        return self._submit(_Job(key, item, rows, run_many))

    def _submit(self, job: _Job) -> Any:
        me = threading.current_thread()
        if me is self._thread or me is self._inline:  # already on the compute: run it here
            return job.run_many([job.item])[0]
        with self._ready:
            inline = self.inline_when_idle and self._inline is None and not self._busy and not self._jobs
            if inline:  # nobody computes or waits: this thread computes, and whoever comes now waits
                self._inline = me
            else:
                self._jobs.append(job)
                self._ready.notify()
        if inline:
            try:
                result = job.run_many([job.item])[0]
                self._observe([job])
                return result
            finally:
                with self._ready:
                    self._inline = None
                    self._ready.notify()
        job.done.acquire()
        if job.error is not None:
            raise job.error
        return job.result

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._jobs or self._inline is not None:
                    self._ready.wait()
                batch = self._take_batch()
                waiting = len(self._jobs)
                self._busy = True
            try:
                if self.threads is not None:
                    self.threads.before(len(batch), waiting)
                results = batch[0].run_many([job.item for job in batch])
                for job, result in zip(batch, results, strict=True):
                    job.result = result
            except BaseException as error:  # every member's; the thread goes on serving
                for job in batch:
                    job.error = error
            if len(batch) > 1:
                self.batches_run += 1
                self.steps_batched += len(batch)
            self._observe(batch)
            with self._ready:
                self._busy = False
            for job in batch:
                job.done.release()
            # Hold nothing of a finished batch while waiting for the next: a span given back (a rest, a
            # move) must be collectable, not kept alive by the last job that touched it.
            batch = results = job = None

    def _observe(self, batch: list[_Job]) -> None:
        """Tell ``observe_batch`` the rows of a batched pass (a decode pass, even of one caller)."""
        if self.observe_batch is not None and batch[0].key is not None:
            self.observe_batch(sum(job.rows for job in batch))

    def _take_batch(self) -> list[_Job]:
        """The oldest job, and the waiting jobs of its key, oldest first, while their rows fit."""
        first = self._jobs.popleft()
        if first.key is None:
            return [first]
        batch, rows, kept = [first], first.rows, deque()
        for job in self._jobs:
            if job.key == first.key and rows + job.rows <= self.max_batch_rows:
                batch.append(job)
                rows += job.rows
            else:
                kept.append(job)
        self._jobs = kept
        return batch
