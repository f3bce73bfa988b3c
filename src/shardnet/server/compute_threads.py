"""How many torch threads the compute thread uses for the next forward pass, chosen from the load.

A server shares its cores: with the other servers of a chain on the same machine, with a client, with
whatever else the owner runs. Two cases pull apart (mid benchmark model, 3 servers on 2 cores,
2026-11-22): one client's decode step is fastest with every core on it (the servers of a chain
compute in turn), but 16 concurrent clients keep every server computing at once, and then each
server's OpenMP team fights the others' for the same cores: 1.2x one client's tokens/s with all
cores per server, 2.8x with one thread each.

So, unless the owner fixed ``--torch-threads``, the server decides per forward pass: ``most`` threads
while it serves one step at a time, one thread while it is loaded (a batch of several sessions, steps
waiting behind this one, or either in the last ``hold_s`` seconds; the hold keeps a loaded server from
switching back for the odd step that arrives alone between two batches).

``most`` is all the process's cores only where they make a lone step faster: at start the server times
decode steps of its span with all of them and with one (``choose_most``), and keeps all only if they
are at least ``MIN_GAIN`` faster. On a 2-core machine whose memory bandwidth bounds a decode step, two
threads gained nothing (tiny: 1.69 vs 1.87 ms a 4-block step; mid: 25 vs 25 ms), and one thread leaves
the other core to the client and to the other servers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

MIN_GAIN = 0.15  # all cores for a lone step only when they make it at least this much faster


class ComputeThreads:
    """Called on the compute thread before each forward pass; sets torch's threads when they change."""

    def __init__(self, most: int, adaptive: bool, hold_s: float = 1.0):
        self.most = max(1, most)  # the threads of a lone step (all the process's cores by default)
        self.adaptive = adaptive  # False: always ``most`` (the owner set --torch-threads)
        self.hold_s = hold_s
        self._loaded_until = 0.0  # monotonic time until which the server counts as loaded
        self.current = torch.get_num_threads()  # what the compute thread has now

    @classmethod
    def for_server(cls, fixed: int | None) -> ComputeThreads:
        """``fixed``: the owner's --torch-threads (None: choose, from torch's default, the cores)."""
        if fixed:
            return cls(fixed, adaptive=False)
        return cls(torch.get_num_threads(), adaptive=True)

    def choose_most(self, new_runner: Callable[[], Callable[[int], None]], steps: int = 6) -> int:
        """Time decode steps of the whole span (``new_runner()`` gives ``run_step(position)`` over a fresh
        cache) with every thread and with one, on the compute thread; keep every thread for lone steps
        only if they gain ``MIN_GAIN``."""
        if not self.adaptive or self.most == 1:
            return self.most

        def median_s(threads: int) -> float:
            torch.set_num_threads(threads)
            run_step, times = new_runner(), []
            for position in range(steps + 2):
                began = time.perf_counter()
                run_step(position)
                if position >= 2:  # two warm-up steps
                    times.append(time.perf_counter() - began)
            return statistics.median(times)

        every, one = median_s(self.most), median_s(1)
        if every > one * (1 - MIN_GAIN):
            self.most = 1
        torch.set_num_threads(self.most)
        self.current = self.most
        return self.most

    def before(self, sessions: int, waiting: int) -> int:
        """Threads for a forward pass over ``sessions`` sessions' steps with ``waiting`` more queued."""
        wanted = self.most
        if self.adaptive and self.most > 1:
            now = time.monotonic()
            if sessions > 1 or waiting > 0:
                self._loaded_until = now + self.hold_s
            if now < self._loaded_until:
                wanted = 1
        if wanted != self.current:
            torch.set_num_threads(wanted)

            self.current = wanted
        return wanted
