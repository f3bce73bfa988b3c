"""The one failover policy: what is retried, what is charged to the retry budget, who is banned, and how
long a step may take before it is hedged.

Stateless forwards (``client/forward.py``), inference sessions (``client/session.py``) and pushed steps
(``client/push_chain.py``) all decide through a ``Failover`` made for the request at hand:

- **Retryable or not.** An error no other server can fix (a bad request, a model mismatch) is raised at
  once. The rest fail over.
- **The budget.** ``max_retries`` bounds the failovers of one request: hops that had been serving it and
  then failed (died, refused, answered late). A server that cannot be reached at all when a session is
  opened on it (its record outlived it: "Connection refused") is not charged: it is excluded for this
  request and the next holder is tried, so a dead server's stale records never use up the budget while
  live replicas stand ready; the same holds for a stateless forward. What bounds those tries is the
  route timeout (``RoutePlanner.route``).
- **Bans.** A server that failed is avoided by every model of the process for a backoff that doubles
  (``ServerTrust``), except when the failure says nothing about the server: it ended the session on its
  own (idle reclaim, drain), or the session is gone there.
- **Hedging.** Each step has a budget from the server's expected step time: its measured round trip, its
  announced throughput and its recent steps, times ``HEDGE_FACTOR``, never below the client's
  ``hedge_floor_s`` (a few seconds) nor above ``request_timeout_s``. A step past its budget is hedged:
  the hop is replaced and the step replayed there, and the late server's answer, if it ever comes, is
  dropped. A frozen server then costs seconds, not the request timeout.
- **Broken links.** A server that answers the client but cannot push to the next one is not at fault:
  nobody is banned, the client delivers that step itself, and the pair's link is avoided for pushes a
  while (``ServerTrust.report_broken_link``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from shardnet.client.config import ClientConfig
from shardnet.client.routing import RouteHop
from shardnet.client.trust import ServerTrust
from shardnet.errors import (
    RouteNotFoundError,
    ServerUnavailableError,
    SessionError,
    SessionExpiredError,
    ShardnetError,
    StepTimeoutError,
)

logger = logging.getLogger(__name__)
HEDGE_FACTOR = 4.0  # a step may take this many times its expected time before it is hedged
DEFAULT_STEP_S = 0.05  # expected compute of one position on a server that announced no throughput
RECENT_SMOOTHING = 0.3  # weight of a new step in a stream's moving average of seconds per position


def expected_step_s(hop: RouteHop, positions: int, rtt_s: float | None, recent_s: float | None) -> float:
    """What one step of ``positions`` new positions should take on ``hop``, wire included.

    ``recent_s``: the stream's moving average of seconds per position (None before its first step). The
    announced throughput is decode steps/s of the server's whole span; a prefill is priced as that many
    decode steps, an overestimate on a GPU, which only makes a hedge later."""
    record = hop.server.record
    per_position = DEFAULT_STEP_S if record.throughput <= 0 else 1.0 / record.throughput
    per_position *= (hop.end - hop.start) / max(record.end - record.start, 1)
    if recent_s is not None:
        per_position = max(per_position, recent_s)
    return (rtt_s or 0.0) + positions * per_position


@dataclass
class Failover:
    """The failover state of one request: a stateless forward, one session step, or a session's opening."""

    config: ClientConfig
    health: ServerTrust
    label: str  # for logs: "forward" or "session=1a2b3c4d"
    failures: int = 0  # failovers charged to this request
    failed_peers: set[str] = field(default_factory=set)  # servers not retried within this request

    @property
    def excluded(self) -> frozenset[str]:
        return frozenset(self.failed_peers)

    def budget_s(self, hop: RouteHop, positions: int, recent_s: float | None = None) -> float:
        """How long a step of ``positions`` on ``hop`` may run before it is hedged."""
        expected = expected_step_s(hop, positions, self.health.rtt(hop.peer_id), recent_s)
        return min(max(HEDGE_FACTOR * expected, self.config.hedge_floor_s), self.config.request_timeout_s)

    def failed(self, hop: RouteHop, error: ShardnetError, opening: bool = False) -> None:
        """A hop failed this request: raise what no retry can fix, or what is left after ``max_retries``;
        else ban the server (unless the failure was not its own) and exclude it from this request.

        ``opening``: it failed before serving any of this request (a session being opened on it, or a
        stateless forward sent to it), so an unreachable server is a stale record, not a failover."""
        if not self.retryable(error):
            raise error
        unreachable = opening and isinstance(error, ServerUnavailableError)
        if not unreachable:
            self.failures += 1
            if self.failures > self.config.max_retries:
                logger.warning(
                    "%s gives up after %d failovers: %s", self.label, self.config.max_retries, error
                )
                raise error
        if isinstance(error, StepTimeoutError):
            self.health.count("hedges")
            logger.info("%s: hedged %s, late past its budget: %s", self.label, hop, error)
        if self.server_at_fault(error):
            self.health.report_failure(hop.peer_id, str(error))
            self.failed_peers.add(hop.peer_id)
        self.health.count("failovers")

    @staticmethod
    def retryable(error: ShardnetError) -> bool:
        """Whether another server (or this one, anew) may succeed. A session that is gone on its server
        (``SessionError``: reclaimed, restarted, or a push it waited for given up) is opened again."""
        return error.retryable or (type(error) is SessionError)

    @staticmethod
    def server_at_fault(error: ShardnetError) -> bool:
        """False when the server is healthy but the session is gone there: it is tried again at once."""
        return not isinstance(error, (SessionExpiredError, SessionError, RouteNotFoundError))

    def broken_link(self, before: RouteHop, after: RouteHop, reason: str) -> None:
        """``before`` answered but could not push to ``after``: neither is banned; the link is avoided."""
        self.health.report_broken_link(before.peer_id, after.peer_id, reason)
        self.health.count("broken_pushes")
        logger.info(
            "%s: %s could not push to %s (%s); the client delivers it", self.label, before, after, reason
        )
