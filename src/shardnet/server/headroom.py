"""The headroom policy: when a server rests (leaves the swarm, frees its weights) and when it returns.

The owner's adapter keeps rewriting one file with a number in [0, 1]: power headroom, battery level,
anything. The server reads it every ``poll_interval_s`` and takes the mean of the readings of the last
``window_s`` seconds. Below ``off`` it rests; above ``on`` it serves again; in between nothing changes
(hysteresis), so a reading that wobbles around one level does not make it flap.

A file that is missing or unreadable, or that holds no number or one outside [0, 1], is logged once
(until a good reading comes back) and the last good reading stands in for it; before any good reading
there is nothing to average, and the server stays as it is. Nothing here touches the server: the
transitions live in ``server/lifecycle.py``.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)
MAX_POLL_INTERVAL_S = 1.0
MIN_POLL_INTERVAL_S = 0.05


class Decision(str, enum.Enum):
    STAY = "stay"  # keep doing what it does
    REST = "rest"  # drain, free the weights, announce RESTING
    RESUME = "resume"  # load again and announce ONLINE


def poll_interval_s(window_s: float) -> float:
    """Read the file ~10 times per window, at most once a second (so a short test window still averages)."""
    return min(MAX_POLL_INTERVAL_S, max(MIN_POLL_INTERVAL_S, window_s / 10))


class HeadroomFile:
    """Reads the adapter's file: the number in it, else the last good one (one warning per bad streak)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.last_good: float | None = None
        self._warned = False

    def read(self) -> float | None:
        """The headroom now: this reading if good, else the last good one (None before any)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError as exc:
            return self._bad(f"cannot read it ({exc.strerror or exc})")
        try:
            value = float(text)
        except ValueError:
            return self._bad(f"{text[:40]!r} is not a number")
        if not 0.0 <= value <= 1.0:  # NaN fails this too
            return self._bad(f"{value:g} is outside [0, 1]")
        if self._warned:
            logger.info("headroom file %s reads %.3f again", self.path, value)
            self._warned = False
        self.last_good = value
        return value

    def _bad(self, why: str) -> float | None:
        if not self._warned:
            self._warned = True
            kept = (
                f"keeping the last good value {self.last_good:.3f}"
                if self.last_good is not None
                else ("no good value yet: the server stays as it is")
            )
            logger.warning("headroom file %s: %s; %s (warned once until it reads well)", self.path, why, kept)
        return self.last_good


class HeadroomPolicy:
    """Rolling mean over ``window_s`` seconds, with hysteresis between ``off`` and ``on``."""

    def __init__(self, on: float, off: float, window_s: float, clock: Callable[[], float] = time.monotonic):
        if not (0.0 <= off < on <= 1.0) or not window_s > 0:
            raise ValueError(f"need 0 <= off < on <= 1 and window_s > 0, got {off}, {on}, {window_s}")
        self.on = on
        self.off = off
        self.window_s = window_s
        self.clock = clock
        self.resting = False  # what the policy last decided (the server follows it)
        self._samples: deque[tuple[float, float]] = deque()  # (clock time, reading)

    def observe(self, value: float | None) -> None:
        """One reading (None: nothing to go on, adds nothing)."""
        if value is None or math.isnan(value):
            return
        now = self.clock()
        self._samples.append((now, value))
        self._forget(now)

    def mean(self) -> float | None:
        """Mean of the readings of the last ``window_s`` seconds; None with none."""
        self._forget(self.clock())
        if not self._samples:
            return None
        return sum(value for _, value in self._samples) / len(self._samples)

    def decide(self) -> Decision:
        """REST when serving and the mean fell below ``off``; RESUME when resting and it rose above ``on``."""
        mean = self.mean()
        if mean is None:
            return Decision.STAY
        if not self.resting and mean < self.off:
            self.resting = True
            return Decision.REST
        if self.resting and mean > self.on:
            self.resting = False
            return Decision.RESUME
        return Decision.STAY

    def _forget(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
