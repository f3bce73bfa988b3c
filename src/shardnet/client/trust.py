"""What this client process trusts of each server, in one place: failures and the bans they earn,
servers suspected of computing wrong (banned for the rest of the process, with the evidence), round-trip
time, own sessions, links between two servers that broke, and counts of what failover and verification
did.

One ``ServerTrust`` is shared by every ``ShardedModel`` of a process (``ServerTrust.shared()``), so a
server that failed for one model is avoided by the others, and sessions opened by several models (or
threads) count towards the same servers' load. Keys are peer ids (base58).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from shardnet.wire.clock_offset import ClockOffset

logger = logging.getLogger(__name__)


@dataclass
class _PeerHealth:
    failures: int = 0  # consecutive failures, reset by a successful open
    banned_until: float = 0.0  # time.monotonic() before which the peer is not routed to
    rtt_s: float | None = None  # smoothed round-trip time of a cheap call, seconds
    open_sessions: int = 0  # sessions this process holds on the peer now
    clock: ClockOffset = field(default_factory=ClockOffset)  # its clock against ours (pings, opens, steps)


@dataclass(frozen=True)
class Suspicion:
    """A server outvoted by other holders of the same blocks (``client/verification.py``)."""

    peer_id: str
    blocks: tuple[int, int]  # half-open span whose output it got wrong
    evidence: str  # what was compared, and by whom: logged, and kept for the user
    at: float  # time.time() it was found


class ServerTrust:
    """Thread-safe failure bans with exponential backoff, suspicions, measured RTTs and this process's open
    sessions."""

    _shared: ServerTrust | None = None
    _shared_lock = threading.Lock()

    def __init__(
        self,
        ban_base_s: float = 1.0,
        ban_max_s: float = 60.0,
        rtt_smoothing: float = 0.3,
        link_retry_s: float = 30.0,
    ):
        self.ban_base_s = ban_base_s  # first ban after a failure; doubles with each further failure
        self.ban_max_s = ban_max_s  # longest ban
        self.rtt_smoothing = rtt_smoothing  # weight of a new RTT sample in the moving average
        self.link_retry_s = link_retry_s  # a link that broke is not pushed over again before this long
        self._peers: dict[str, _PeerHealth] = {}
        self._broken_links: dict[tuple[str, str], float] = {}  # (from, to) -> time.monotonic() to retry at
        self._suspicions: dict[str, Suspicion] = {}  # peer id -> the first evidence against it
        self._counts: Counter[str] = Counter()
        self._check_errors: deque[float] = deque(maxlen=100_000)  # worst relative error of each check
        self._lock = threading.Lock()
        # Held while a route is chosen and its sessions counted, so concurrent choices see each other.
        self.routing_lock = threading.Lock()

    @classmethod
    def shared(cls) -> ServerTrust:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def _peer(self, peer_id: str) -> _PeerHealth:
        peer = self._peers.get(peer_id)
        if peer is None:
            peer = self._peers[peer_id] = _PeerHealth()
        return peer

    # ---- failures and bans ----

    def report_failure(self, peer_id: str, reason: str) -> float:
        """Ban the peer for a backoff that doubles with each consecutive failure; returns the ban in s.

        Failures reported while the peer is banned already (several sessions that saw the same outage)
        count as one: they do not double the ban again."""
        with self._lock:
            peer = self._peer(peer_id)
            now = time.monotonic()
            if peer.banned_until <= now:
                peer.failures += 1
            ban_s = min(self.ban_base_s * 2 ** (max(peer.failures, 1) - 1), self.ban_max_s)
            peer.banned_until = max(peer.banned_until, now + ban_s)
        logger.info("avoiding peer=..%s for %.1fs: %s", peer_id[-4:], ban_s, reason)
        return ban_s

    def report_success(self, peer_id: str) -> None:
        peer = self._peers.get(peer_id)
        if peer is not None and peer.failures:
            with self._lock:
                peer.failures = 0
                peer.banned_until = 0.0

    def banned(self) -> frozenset[str]:
        """Servers not routed to now: those in a failure's backoff, and every suspected one."""
        now = time.monotonic()
        with self._lock:
            timed = (pid for pid, peer in self._peers.items() if peer.banned_until > now)
            return frozenset(timed).union(self._suspicions)

    # ---- servers that computed wrong ----

    def suspect(self, peer_id: str, blocks: tuple[int, int], evidence: str) -> None:
        """Ban ``peer_id`` for the rest of this process: other holders of ``blocks`` outvoted its output.
        The evidence is logged as a warning (a volunteer's server gave wrong results) and kept."""
        with self._lock:
            if peer_id in self._suspicions:
                return
            self._suspicions[peer_id] = Suspicion(peer_id, blocks, evidence, time.time())
            self._counts["suspected"] += 1
        logger.warning(
            "server peer=%s computed blocks %d:%d wrong; not using it again in this process. %s",
            peer_id,
            *blocks,
            evidence,
        )

    def checked(self, worst_error: float) -> None:
        """A verification check compared a hop's outputs with a witness's: its worst relative error."""
        with self._lock:
            self._counts["checks"] += 1
            self._check_errors.append(worst_error)

    def check_errors(self) -> list[float]:
        """The worst relative error of each check so far (the last 100,000): how far honest servers
        differ, against the tolerance (benchmarks/verification.py)."""
        with self._lock:
            return list(self._check_errors)

    def suspected(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._suspicions)

    def suspicions(self) -> list[Suspicion]:
        with self._lock:
            return list(self._suspicions.values())

    def next_unban_s(self) -> float | None:
        """Seconds until the earliest current ban ends, or None if nobody is banned."""
        now = time.monotonic()
        with self._lock:
            waits = [peer.banned_until - now for peer in self._peers.values() if peer.banned_until > now]
        return min(waits) if waits else None

    # ---- round-trip time ----

    def record_rtt(self, peer_id: str, rtt_s: float) -> None:
        with self._lock:
            peer = self._peer(peer_id)
            if peer.rtt_s is None:
                peer.rtt_s = rtt_s
            else:
                peer.rtt_s += self.rtt_smoothing * (rtt_s - peer.rtt_s)

    def clock(self, peer_id: str) -> ClockOffset:
        """The peer's clock against this process's, dated by every exchange with it (step timings)."""
        with self._lock:
            return self._peer(peer_id).clock

    def rtt(self, peer_id: str) -> float | None:
        """One peer's smoothed RTT (None if never measured): per step, without copying every peer's."""
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.rtt_s

    def rtts(self) -> dict[str, float]:
        with self._lock:
            return {pid: peer.rtt_s for pid, peer in self._peers.items() if peer.rtt_s is not None}

    # ---- this process's sessions ----

    def session_opened(self, peer_id: str) -> None:
        with self._lock:
            self._peer(peer_id).open_sessions += 1

    def session_closed(self, peer_id: str) -> None:
        with self._lock:
            peer = self._peer(peer_id)
            peer.open_sessions = max(peer.open_sessions - 1, 0)

    def open_sessions(self) -> dict[str, int]:
        with self._lock:
            return {pid: peer.open_sessions for pid, peer in self._peers.items() if peer.open_sessions}

    # ---- links between servers ----

    def report_broken_link(self, sender: str, receiver: str, reason: str) -> None:
        """``sender`` could not push to ``receiver``, though the client reaches both: not a server's fault."""
        with self._lock:
            self._broken_links[(sender, receiver)] = time.monotonic() + self.link_retry_s
        logger.info(
            "not pushing from peer=..%s to peer=..%s for %.0fs: %s",
            sender[-4:],
            receiver[-4:],
            self.link_retry_s,
            reason,
        )

    def link_broken(self, sender: str, receiver: str) -> bool:
        until = self._broken_links.get((sender, receiver))
        return until is not None and until > time.monotonic()

    # ---- what failover did (the chaos benchmark and the logs read these) ----

    def count(self, event: str, times: int = 1) -> None:
        with self._lock:
            self._counts[event] += times

    def counts(self) -> dict[str, int]:
        """Events so far in this process: failovers, hedges, broken_pushes, handoffs, replays, and what
        verification did: checks, disputes, suspected, recomputed."""
        with self._lock:
            return dict(self._counts)
