"""Where a step's time went, hop by hop, along its critical path.

A step's time is split into four parts per hop, which add up to the step's time as the client measured it:

    network_s   getting the step into this hop: for the first hop of a chain, the client encoding it and
                the one-way trip to the server; for a pushed hop, the server before it encoding its output
                and the one-way trip of the push
    queue_s     on the server, from the step's arrival to its output being ready, less the compute:
                decoding, checks, waiting for the compute queue or a batch to fill
    compute_s   the server running its blocks
    return_s    the output coming back to the client and decoded there, for an answer on the critical path
                (the last hop of a push chain; every hop the client chains itself); 0 for the hops of a
                push chain whose answers the client does not wait for

A hop that failed during the step has one part instead, ``failover_s``: from its input being ready (the
step's start for a chain's first hop, else the output before it at the client) to its replacement's output,
so the wait until the failure was acted on (an error, or the hedge budget running out) counts too.

A one-way trip is dated on both clocks, through their estimated offset (wire/clock_offset.py): the sender
stamps its leaving, the receiver its arrival. The client dates each server's clock from its own exchanges
with it (the session's opening, the steps it sends itself); a pushing server dates the next server's from
its pushes and their acknowledgements, and reports the push's one-way time. Where no offset is known yet
(an older server), a one-way trip is half a round trip, less the far side's time: the client's own to the
chain's first server, the push's, or for the return from a chain's last server the client's measured round
trip to that server (its swarm view's pings), or the first hop's.

Under push the client reads the answers of a chain's earlier servers after the step's output, when the
session is next used or closed: until then their hops are ``pending`` (their parts unknown), never zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shardnet.wire.clock_offset import ClockOffset


@dataclass
class HopTiming:
    """One hop's share of one step, in seconds (see the module's docstring)."""

    span: str = ""  # "start:end" of the hop's blocks
    peer_id: str = ""
    network_s: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    return_s: float = 0.0
    failover_s: float = 0.0  # a failed hop: from its input being ready to its replacement's output
    pending: bool = True  # the answers this hop's parts come from are not read yet
    failed_over: bool = False  # the hop failed during the step: its blocks ran on a replacement

    @property
    def total_s(self) -> float:
        return self.network_s + self.queue_s + self.compute_s + self.return_s + self.failover_s

    def as_ms(self) -> dict:
        """For JSON: each part in milliseconds; parts of a pending hop are None."""
        known = not self.pending

        def ms(seconds: float) -> float | None:
            return round(seconds * 1e3, 3) if known else None

        return {
            "span": self.span,
            "peer_id": self.peer_id,
            "network_ms": ms(self.network_s),
            "queue_ms": ms(self.queue_s),
            "compute_ms": ms(self.compute_s),
            "return_ms": ms(self.return_s),
            "failover_ms": ms(self.failover_s),
            "total_ms": ms(self.total_s),
            "pending": self.pending,
            "failed_over": self.failed_over,
        }


@dataclass
class StepTiming:
    """One step of a session: its time as the client measured it, and each hop's share."""

    step_s: float = 0.0  # the step through every hop, from sending its input to holding its output
    positions: int = 0  # new positions the step carried (the prompt's length for a prefill, 1 to decode)
    hops: list[HopTiming] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        return any(hop.pending for hop in self.hops)

    @property
    def critical_path_s(self) -> float:
        """The hops' parts added up: the step's time, once no hop is pending (the one-way estimates aside)."""
        return sum(hop.total_s for hop in self.hops if not hop.pending)

    def as_ms(self) -> dict:
        return {
            "step_ms": round(self.step_s * 1e3, 3),
            "critical_path_ms": None if self.pending else round(self.critical_path_s * 1e3, 3),
            "positions": self.positions,
            "pending": self.pending,
            "hops": [hop.as_ms() for hop in self.hops],
        }


@dataclass(frozen=True)
class _Answer:
    """What one server said of its part of a step, and when its answer was read (``time.perf_counter()``)."""

    queue_s: float
    compute_s: float
    send_s: float
    push_s: float
    push_one_way_s: float  # 0: unknown
    handle_s: float
    pushed_on: bool  # it pushed the step on to the next hop (no push_error)
    server_arrived: float  # the step's arrival, on the server's clock (0: an older server)
    server_replied: float  # the answer made, on the server's clock
    arrived: float  # the answer reached the client (its stream's reader thread)
    decoded: float  # the output decoded on the client


class ChainClock:
    """Fills the ``HopTiming`` of each hop of one step through a chain of hops (one hop when the client
    sends the step itself, several when the servers push it on), as the answers it needs are read.

    A hop's ``network_s`` needs the answer of whoever sent it the step: the client's own clock (the chain's
    first hop, or a hop the client delivered the step to when a push failed), else the server before it
    (its encoding and the push's one-way time). The return from a hop whose answer is on the critical path
    needs the one-way time back to the client. One-way times come from ``clocks`` (each hop's server's
    clock against the client's, see the module's docstring); without one, from half a round trip: the
    hop's own when the client sent it the step, else ``round_trip_s(peer_id)`` (the client's pings), else
    the chain's first hop's."""

    def __init__(
        self,
        hops: list[HopTiming],
        began: float,
        clocks: list[ClockOffset | None],
        round_trip_s: Callable[[str], float | None],
    ):
        self.hops = hops
        self._began = began  # the step's start at the client, before encoding it
        self._clocks = clocks  # each hop's server's clock against the client's (None: not known)
        self._round_trip_s = round_trip_s
        count = len(hops)
        self._sent: list[float | None] = [None] * count  # the client sent the step to this hop then
        self._available: list[float | None] = [None] * count  # this hop's output was at the client then
        self._answers: list[_Answer | None] = [None] * count

    def sent(self, index: int, when: float) -> None:
        """The client sent hop ``index`` the step at ``when`` (after encoding it)."""
        self._sent[index] = when

    def answered(self, index: int, result, arrived: float, decoded: float) -> None:
        """Hop ``index``'s answer (a ``pb.StepResult``), read at ``arrived``, its output decoded at ``decoded``."""
        handle_s = max(result.handle_s, result.compute_s)  # an older server reports no handle_s
        self._answers[index] = _Answer(
            queue_s=result.queue_s,
            compute_s=result.compute_s,
            send_s=result.send_s,
            push_s=result.push_s,
            push_one_way_s=result.push_one_way_s,
            handle_s=handle_s,
            pushed_on=bool(result.push_s) and not result.push_error,
            server_arrived=result.arrived_at_s,
            server_replied=result.replied_at_s,
            arrived=arrived,
            decoded=decoded,
        )
        sent, clock = self._sent[index], self._clocks[index]
        if sent is not None and clock is not None:  # an exchange of the client's: it dates the server's clock
            clock.add(sent, result.arrived_at_s, result.replied_at_s, arrived)
        self._available[index] = decoded
        self._fill()

    def moved(self, index: int, peer_id: str, clock: ClockOffset) -> None:
        """Hop ``index``'s session moved to another server (a hand-off): its answer comes from there."""
        self.hops[index].peer_id = peer_id
        self._clocks[index] = clock

    def failed_over(self, index: int, began: float, ended: float) -> None:
        """Hop ``index`` failed; its replacement ran the step from ``began`` to ``ended``. The hop's time
        starts where its input was ready at the client (the step's start, or the output before it): the
        wait for the failure counts, and time the hop before it already counts does not."""
        ready = self._began if index == 0 else self._available[index - 1]
        hop = self.hops[index]
        hop.failed_over, hop.pending = True, False
        hop.failover_s = ended - (began if ready is None else ready)
        self._available[index] = ended
        self._fill()

    def _fill(self) -> None:
        for index, hop in enumerate(self.hops):
            answer = self._answers[index]
            if not hop.pending or answer is None:
                continue
            network_s = self._network_s(index, answer)
            if network_s is None:
                continue
            return_s = 0.0
            if index == len(self.hops) - 1 or not answer.pushed_on:  # the client waited on this answer
                one_way_s = self._one_way_s(index, answer)
                if one_way_s is None:
                    continue
                after_compute_s = max(answer.handle_s - answer.queue_s - answer.compute_s, 0.0)
                return_s = after_compute_s + one_way_s + (answer.decoded - answer.arrived)
            hop.network_s, hop.queue_s, hop.compute_s = network_s, answer.queue_s, answer.compute_s
            hop.return_s, hop.pending = return_s, False

    def _client_round_trip_s(self, index: int, answer: _Answer) -> float | None:
        """The client's round trip to hop ``index`` in this step, when the client sent it the step."""
        sent = self._sent[index]
        return None if sent is None else max(answer.arrived - sent - answer.handle_s, 0.0)

    def _network_s(self, index: int, answer: _Answer) -> float | None:
        round_trip_s = self._client_round_trip_s(index, answer)
        if round_trip_s is not None:  # the client sent it: from the step's start, or the output before it
            origin = self._began if index == 0 else self._available[index - 1]
            if origin is None:
                return None
            sent, clock = self._sent[index], self._clocks[index]
            one_way_s = None if clock is None else clock.one_way_to(sent, answer.server_arrived)
            return sent - origin + (round_trip_s / 2 if one_way_s is None else one_way_s)
        before = self._answers[index - 1] if index else None
        if before is None:
            return None
        return before.send_s + (before.push_one_way_s or before.push_s / 2)

    def _one_way_s(self, index: int, answer: _Answer) -> float | None:
        """The answer's trip back to the client."""
        clock = self._clocks[index]
        if clock is not None:
            measured = clock.one_way_from(answer.server_replied, answer.arrived)
            if measured is not None:
                return measured
        own = self._client_round_trip_s(index, answer)
        if own is not None:
            return own / 2
        measured = self._round_trip_s(self.hops[index].peer_id)
        if measured is not None:
            return measured / 2
        first = self._answers[0]
        first_s = None if first is None else self._client_round_trip_s(0, first)
        return None if first_s is None else first_s / 2
