"""ThroughputMeter: the decode speed a server announces, so clients can rank replicas by it.

A probe at start-up gives the first figure (warm-up steps first, then the median of several, since
the first steps are slow and other servers of the machine may still be loading). From then on every
single-position step of a session refines it: the announced figure follows what the span really does.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

_SMOOTHING = 0.05  # weight of one observed step in the moving average


class ThroughputMeter:
    def __init__(self, span_blocks: int):
        self.span_blocks = span_blocks  # blocks the server holds: the announced figure is for all of them
        self._block_s: float | None = None  # seconds per block of one decode step (batch 1, one position)
        self._lock = threading.Lock()

    def probe(self, run_step: Callable[[int], None], warmup: int = 2, repeats: int = 5) -> None:
        """Time ``run_step(position)`` (a whole-span decode step) and start the estimate from its median."""
        times = []
        for position in range(warmup + repeats):
            began = time.perf_counter()
            run_step(position)
            if position >= warmup:
                times.append(time.perf_counter() - began)
        with self._lock:
            self._block_s = statistics.median(times) / self.span_blocks

    def observe(self, compute_s: float, blocks: int, batch: int, positions: int) -> None:
        """Fold in one real step of a session (only single-position, batch-1 steps are comparable)."""
        if positions != 1 or batch != 1 or blocks < 1:
            return
        sample = compute_s / blocks
        with self._lock:
            if self._block_s is None:
                self._block_s = sample
            else:
                self._block_s += _SMOOTHING * (sample - self._block_s)

    @property
    def steps_per_s(self) -> float:
        """Decode steps per second of the whole span at batch 1; 0 before any measurement."""
        with self._lock:
            block_s = self._block_s
        return 0.0 if block_s is None else 1.0 / max(block_s * self.span_blocks, 1e-9)
