"""Where an inference session's hops come from: opened over a route, replayed into, replaced when they
fail (``replace_hop``), adopted from a draining server (``adopt_hop``), rebuilt from corrected outputs
when one lied (``recompute_from``).

``HopReplacement`` is the part of ``InferenceSession`` (``client/session.py``) that does this; stepping,
reorders and rollbacks stay there. Whom to retry, charge and ban is ``client/failover.py``'s to decide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shardnet.client.failover import Failover
from shardnet.client.handoff import adopt_stream
from shardnet.client.history import GrowingBuffer
from shardnet.client.hop_stream import SpanStream
from shardnet.client.routing import RouteHop, describe
from shardnet.errors import ShardnetError
from shardnet.wire import pb

if TYPE_CHECKING:
    pass

logger = logging.getLogger("shardnet.client.session")


@dataclass(eq=False)
class SessionHop:
    stream: SpanStream
    inputs: GrowingBuffer  # [batch, positions, hidden] every hidden state this hop was given

    @property
    def hop(self) -> RouteHop:
        return self.stream.hop


class Replay:
    """Everything a replacement server must see: history plus the step being retried."""

    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor):
        self.hidden = hidden  # [batch, positions, hidden] inputs of the first replacement hop
        self.mask = mask  # [batch, positions] or None when no padding was ever sent
        self.positions = positions  # [batch, positions]
        self.output: torch.Tensor | None = None  # [batch, positions, hidden] the replacements' output


class HopReplacement:
    """Opening, replaying and replacing the hops of ``InferenceSession`` (mixed into it)."""

    def replace_hop(
        self, hop: SessionHop, hop_input: torch.Tensor | None, failover: Failover
    ) -> torch.Tensor:
        """Route ``hop``'s blocks again, replaying its history and ``hop_input`` (what it was given for the
        step at hand, whose positions the session holds already when no step is running; None: nothing
        more) into the replacements; returns their output for all those positions."""
        inputs = hop.inputs.view() if hop_input is None else hop.inputs.with_tail(hop_input)
        if self._current is not None:
            step_mask, positions = self._current
            mask = self._mask.with_tail(step_mask) if step_mask is not None else None
            replay = Replay(inputs, mask, self._positions.with_tail(positions))
        else:
            replay = Replay(inputs, self.mask_history(0, self.position), self._positions.view())
        self._planner.view.request_refresh()  # in the background: the failed server is excluded already
        replacements = self._reopen(hop, replay, failover)
        self.failovers += 1
        self.health.count("replays")
        logger.info(
            "session=%s failed over %d:%d to %s, replayed %d positions",
            self.short_id,
            hop.hop.start,
            hop.hop.end,
            describe([r.hop for r in replacements]),
            replay.hidden.shape[1],
        )
        return replay.output

    def _reopen(self, hop: SessionHop, replay: Replay, failover: Failover) -> list[SessionHop]:
        """Close ``hop``'s stream and open its blocks again (maybe over several servers), replayed."""
        index = self._hops.index(hop)
        hop.stream.close()
        self.health.session_closed(hop.hop.peer_id)
        replacements, replay.output = self._open(hop.hop.start, hop.hop.end, replay, failover)
        self._hops[index : index + 1] = replacements
        return replacements

    def recompute_from(self, liar: SessionHop) -> tuple[list[SessionHop], torch.Tensor]:
        """``liar`` computed wrong (``client/verification.py``): route its blocks again and replay its
        history there, then rebuild every later hop from the corrected outputs (their histories hold the
        liar's). Returns the replacements and the session's corrected output for every position."""
        failover = self._failover()
        index = self._hops.index(liar)
        count = len(self._hops)
        output = self.replace_hop(liar, None, failover)
        replacements = self._hops[index : index + len(self._hops) - count + 1]
        for hop in list(self._hops[index + len(replacements) :]):
            replay = Replay(output, self.mask_history(0, self.position), self._positions.view())
            self._reopen(hop, replay, failover)
            output = replay.output
        return replacements, output

    def adopt_hop(self, hop: SessionHop, moved: pb.Moved, failover: Failover) -> SessionHop | None:
        """Open the session where ``hop``'s draining server handed it (``client/handoff.py``); returns the
        new hop, now in ``hop``'s place, or None when that fails (then the caller replays)."""
        stream = adopt_stream(self, hop, moved, failover)
        if stream is None:
            return None
        adopted = SessionHop(stream, hop.inputs)  # the same history: nothing to replay
        self._hops[self._hops.index(hop)] = adopted
        hop.stream.close()
        self.health.session_closed(hop.hop.peer_id)
        self.health.session_opened(stream.hop.peer_id)
        self.handoffs += 1
        self.health.count("handoffs")
        logger.info("session=%s: %s handed over to %s, nothing replayed", self.short_id, hop.hop, stream.hop)
        return adopted

    def open_stream(self, route_hop: RouteHop, open_timeout_s: float, adopt_token: bytes = b"") -> SpanStream:
        """A stream of this session to ``route_hop``'s server: a new session there, or an adopted one."""
        return SpanStream(
            self._transport,
            route_hop,
            self.model_id,
            self.batch_size,
            self.max_length,
            self.session_id,
            open_timeout_s,
            self.board,
            adopt_token=adopt_token,
            adapter=self._config.active_adapter or "",
            clock=self.health.clock(route_hop.peer_id),
        )

    def _open(
        self, start: int, end: int, replay: Replay | None, failover: Failover
    ) -> tuple[list[SessionHop], torch.Tensor | None]:
        """Open sessions covering blocks start:end, replaying into each; returns them and the last output."""
        hops: list[SessionHop] = []
        reserved: list[RouteHop] = []  # hops counted as this process's sessions but not opened yet
        block, hidden = start, None if replay is None else replay.hidden
        try:
            while block < end:
                reserved = self._planner.route(
                    block, end, self._needs, reserve=True, exclude=failover.excluded
                )
                while reserved:
                    route_hop = reserved[0]
                    try:
                        hop, hidden = self._open_hop(route_hop, hidden, replay, failover)
                    except ShardnetError as error:
                        failover.failed(route_hop, error, opening=True)
                        self._planner.view.request_refresh()
                        break  # route the rest again, without the server that just failed
                    reserved.pop(0)
                    hops.append(hop)
                    block = route_hop.end
                for route_hop in reserved:
                    self.health.session_closed(route_hop.peer_id)
                reserved = []
        except BaseException:
            for route_hop in reserved:
                self.health.session_closed(route_hop.peer_id)
            for hop in hops:
                hop.stream.close()
                self.health.session_closed(hop.hop.peer_id)
            raise
        return hops, hidden

    def refresh_view(self, max_age_s: float = 1.0) -> None:
        """Look the swarm up now (a hand-off's new holder may be newer than the last view). Failovers do
        not wait for this: its pings could wait on the very server that just became unreachable."""
        try:
            self._planner.view.refresh(max_age_s=max_age_s)
        except ShardnetError as exc:
            logger.warning(
                "session=%s: swarm refresh failed, routing on the last view: %s", self.short_id, exc
            )

    def _open_hop(
        self, route_hop: RouteHop, hidden: torch.Tensor | None, replay: Replay | None, failover: Failover
    ) -> tuple[SessionHop, torch.Tensor | None]:
        """Open one server's session and replay ``hidden`` into it; returns it and the replay's output."""
        config = self._config
        stream = self.open_stream(route_hop, failover.budget_s(route_hop, 0))
        inputs = GrowingBuffer(self.max_length)
        out = None
        try:
            if replay is not None:
                row_bytes = hidden.shape[0] * hidden.shape[2] * hidden.element_size()
                chunk = max(1, config.max_message_bytes // (2 * row_bytes))  # positions per message
                budget = lambda positions: failover.budget_s(route_hop, positions)  # noqa: E731
                out = stream.step_chunked(hidden, replay.mask, replay.positions, chunk, budget)
                inputs.append(hidden)
        except BaseException:
            stream.close()
            raise
        self.health.report_success(route_hop.peer_id)
        return SessionHop(stream, inputs), out
