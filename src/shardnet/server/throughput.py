"""ThroughputMeter: the decode speed a server announces, so clients can rank replicas by it.

A probe at start-up times whole-span decode steps at batch 1: warm-up steps first, then the median of
several. Each step counts the smaller of its wall time and the CPU time the process spent on it
divided by torch's threads: on a busy machine (other servers still loading, say) a step can wait for
a core for longer than it computes, and wall time alone made two copies of one span announce speeds
14x apart, which sent every session to one of them. The CPU-time figure says what the span can do.
On a GPU the CPU mostly waits for the device, so only wall time counts there.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class ThroughputMeter:
    def __init__(self, span_blocks: int):
        self.span_blocks = span_blocks  # blocks the server holds: the figure is for all of them
        self.step_s: float | None = None  # seconds of one whole-span decode step at batch 1

    def probe(
        self, run_step: Callable[[int], None], warmup: int = 2, repeats: int = 5, host_compute: bool = True
    ) -> float:
        """Time ``run_step(position)`` (a whole-span decode step, finished when it returns); returns
        steps/s. ``host_compute``: the step computes on this machine's CPU (so CPU time may count)."""
        times = []
        threads = max(torch.get_num_threads(), 1)
        for position in range(warmup + repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            run_step(position)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if position >= warmup:
                times.append(min(wall, cpu / threads) if host_compute and cpu > 0 else wall)
        self.step_s = max(statistics.median(times), 1e-9)
        return self.steps_per_s

    @property
    def steps_per_s(self) -> float:
        """Decode steps per second of the whole span at batch 1; 0 before the probe."""
        return 0.0 if self.step_s is None else 1.0 / self.step_s
