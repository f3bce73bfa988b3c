"""What the gateway generated lately, for the swarm page: the route in use, the latest steps hop by hop,
and a time series of the last minutes (per choice: tokens, decode tokens/s, time to first token; per hop:
its mean time over a choice's decode steps).

Steps are kept as the client's ``StepTiming`` objects, not copies: under push the answers of a chain's
earlier hops are read after the step (when the session is next used or closed), and the client fills the
same objects then. So hops pending when a choice finished have their parts when the page next asks.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

SERIES_WINDOW_S = 600.0  # how far back the page's charts reach
MAX_CHOICES = 512  # choices kept for the charts (older ones leave even inside the window)
MAX_STEPS_PER_CHOICE = 64  # a choice's last decode steps kept for its per-hop means
MAX_RECENT_STEPS = 16  # steps listed one by one under "Recent steps"


@dataclass(frozen=True)
class ChoiceReport:
    """One generated choice, finished or not, as the worker saw it."""

    started_at: float  # time.time() when its generate() call began
    token_offsets_s: tuple[float, ...]  # per generated token, seconds from that call to the token
    prompt_tokens: int  # the prompt's length for a prompt's first choice; 0 for its other choices
    route: list = field(default_factory=list)  # RouteHop of the servers it ran on last
    steps: list = field(default_factory=list)  # its session's StepTiming, one per step, filled in place

    @property
    def time_to_first_token_s(self) -> float | None:
        return self.token_offsets_s[0] if self.token_offsets_s else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, over the time from the first to the last: the decode phase's rate."""
        if len(self.token_offsets_s) < 2:
            return None
        elapsed_s = self.token_offsets_s[-1] - self.token_offsets_s[0]
        return (len(self.token_offsets_s) - 1) / elapsed_s if elapsed_s > 0 else None


@dataclass
class _Choice:
    finished_at: float  # time.time()
    tokens: int
    tokens_per_s: float | None
    ttft_s: float | None
    decode_steps: list  # its last StepTiming objects of one position each


def route_hops(route) -> list[dict]:
    """Route hops (``RouteHop``) as the page shows them."""
    return [
        {
            "span": f"{hop.start}:{hop.end}",
            "peer_id": hop.peer_id,
            "short_id": hop.server.short_id,
            "address": hop.server.address,
        }
        for hop in route
    ]


class RecentActivity:
    """The route and per-hop step timings of the latest generations, and the charts' series."""

    def __init__(self, window_s: float = SERIES_WINDOW_S):
        self.window_s = window_s
        self._lock = threading.Lock()
        self._route: list[dict] = []
        self._steps: deque = deque(maxlen=MAX_RECENT_STEPS)  # StepTiming, newest last
        self._choices: deque[_Choice] = deque(maxlen=MAX_CHOICES)
        self._finished_at: float | None = None

    def record(self, report: ChoiceReport) -> None:
        steps = [step for step in report.steps if step.hops]
        decode = [step for step in steps if step.positions == 1][-MAX_STEPS_PER_CHOICE:]
        now = time.time()
        choice = _Choice(
            now, len(report.token_offsets_s), report.decode_tokens_per_s, report.time_to_first_token_s, decode
        )
        with self._lock:
            if report.route:
                self._route = route_hops(report.route)
            self._steps.extend(steps)
            self._choices.append(choice)
            self._finished_at = now

    def document(self) -> dict:
        """``recent`` of ``/api/swarm``: times are ``time.time()`` seconds; ``now`` is the gateway's."""
        now = time.time()
        with self._lock:
            route, steps, finished_at = list(self._route), list(self._steps), self._finished_at
            choices = [c for c in self._choices if c.finished_at >= now - self.window_s]
        return {
            "route": route,
            "steps": [step.as_ms() for step in steps],
            "finished_at": finished_at,
            "series": {
                "now": now,
                "window_s": self.window_s,
                "choices": [
                    {
                        "at": c.finished_at,
                        "tokens": c.tokens,
                        "tokens_per_s": _rounded(c.tokens_per_s),
                        "ttft_ms": _rounded(None if c.ttft_s is None else c.ttft_s * 1e3),
                    }
                    for c in choices
                ],
                "hops": [point for c in choices for point in _hop_means(c)],
            },
        }


def _hop_means(choice: _Choice) -> list[dict]:
    """Per span of the choice's route, the mean of its hop's total over the decode steps not pending."""
    totals: dict[str, list[float]] = {}
    for step in choice.decode_steps:
        for hop in step.hops:
            if not hop.pending:
                totals.setdefault(hop.span, []).append(hop.total_s)
    return [
        {"at": choice.finished_at, "span": span, "mean_ms": round(sum(t) / len(t) * 1e3, 3), "steps": len(t)}
        for span, t in totals.items()
    ]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
