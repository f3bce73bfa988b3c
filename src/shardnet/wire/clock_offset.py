"""ClockOffset: how far another process's clock runs from this one's, for one-way times across a link.

Each exchange (a request and its reply) gives four stamps: ``sent`` and ``received`` on this clock, the
peer's ``arrived`` and ``replied`` on its own. Neither trip takes negative time, so the offset (peer clock
minus this one) lies between ``replied - received`` and ``arrived - sent``; every exchange narrows that
interval, and the estimate is the middle of what the recent ones leave (NTP's exchanges, intersected).
Its error is half the difference between the quickest trip seen each way, whatever the asymmetry of any
one exchange (an acknowledgement that waited for a busy interpreter, a request behind a queue). With it,
the one-way trip of a later message is the peer's stamp of its arrival, less the offset, less the time it
was sent. Processes on one machine share a clock (the estimate then stays near zero); across machines it
holds while the clocks do not drift apart within the window.

Stamps are ``time.perf_counter()`` values: meaningful only as differences, or through an offset.
"""

from __future__ import annotations

import threading
from collections import deque

SAMPLES = 64  # the recent exchanges an estimate is drawn from (about a minute of decode steps, or less)


class ClockOffset:
    """Thread-safe: a client's pings and its sessions date the same server's clock."""

    def __init__(self, samples: int = SAMPLES):
        self._bounds: deque[tuple[float, float]] = deque(maxlen=samples)  # (lowest, highest) offset, seconds
        self._offset_s: float | None = None  # the estimate from _bounds, made as each exchange is added
        self._lock = threading.Lock()

    def add(self, sent: float, peer_arrived: float, peer_replied: float, received: float) -> None:
        """One exchange; a peer that sends no stamps (0: an older version) adds nothing."""
        if not peer_arrived or not peer_replied:
            return
        with self._lock:
            self._bounds.append((peer_replied - received, peer_arrived - sent))
            self._offset_s = _estimate(self._bounds)

    @property
    def offset_s(self) -> float | None:
        """The peer's clock minus this one (None before any exchange)."""
        return self._offset_s

    def one_way_to(self, sent: float, peer_arrived: float) -> float | None:
        """Seconds from sending (this clock) to the peer's stamp of the arrival (its clock)."""
        offset = self.offset_s
        return None if offset is None or not peer_arrived else max(peer_arrived - offset - sent, 0.0)

    def one_way_from(self, peer_sent: float, received: float) -> float | None:
        """Seconds from the peer's stamp of sending (its clock) to receiving (this clock)."""
        offset = self.offset_s
        return None if offset is None or not peer_sent else max(received - (peer_sent - offset), 0.0)


def _estimate(bounds: deque[tuple[float, float]]) -> float:
    """The middle of what the bounds leave: their intersection, or the quickest exchange's own bounds when
    the clocks moved apart within the window (the intersection is empty)."""
    lowest = max(low for low, _ in bounds)
    highest = min(high for _, high in bounds)
    if lowest > highest:
        lowest, highest = min(bounds, key=lambda bound: bound[1] - bound[0])
    return (lowest + highest) / 2
