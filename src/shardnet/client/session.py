"""InferenceSession: a chain of SpanStreams over a route, which survives the servers it runs on.

Every hop keeps the hidden states that entered it (``GrowingBuffer``, bounded by max_length), and the
session keeps the positions and padding mask of every step. When a server fails a step (dies, times
out, refuses, drains, reclaims the session), only that hop's blocks are routed again, possibly over
several replacement servers with other boundaries; its inputs are replayed to rebuild their caches,
with the failed step's inputs at the end, and the step goes on from the next hop. The replacement
servers compute exactly what the failed one would have, so the tokens are the same as without the
failure. Errors no retry can fix (a bad request, a model mismatch) are raised at once; the failovers
of one step are bounded by ``max_retries``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import torch

from shardnet.client.config import ClientConfig
from shardnet.client.health import ServerHealth
from shardnet.client.history import GrowingBuffer
from shardnet.client.hop_stream import HopTiming, SpanStream
from shardnet.client.planner import RoutePlanner, SessionNeeds
from shardnet.client.routing import RouteHop, describe
from shardnet.client.transport import Transport
from shardnet.devices import HOST
from shardnet.errors import GenerationError, SessionExpiredError, ShardnetError

logger = logging.getLogger(__name__)


@dataclass
class _Hop:
    stream: SpanStream
    inputs: GrowingBuffer  # [batch, positions, hidden] every hidden state this hop was given

    @property
    def hop(self) -> RouteHop:
        return self.stream.hop


class _Replay:
    """Everything a replacement server must see: history plus the step being retried."""

    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor):
        self.hidden = hidden  # [batch, positions, hidden] inputs of the first replacement hop
        self.mask = mask  # [batch, positions] or None when no padding was ever sent
        self.positions = positions  # [batch, positions]
        self.output: torch.Tensor | None = None  # [batch, positions, hidden] the replacements' output


class _PushedStep:
    """A pushed step whose intermediate replies are still to be read (see InferenceSession._collect)."""

    def __init__(self, hops: list[_Hop], step_ids: list[int], hidden: torch.Tensor, began: float):
        self.hops = hops  # the route the step went through
        self.step_ids = step_ids  # its step id on each hop's stream
        self.hidden = hidden  # [batch, new, hidden] the first hop's input
        self.began = began
        self.timings = [HopTiming() for _ in hops[:-1]]  # filled in as the replies are read


class InferenceSession:
    def __init__(
        self,
        planner: RoutePlanner,
        transport: Transport,
        health: ServerHealth,
        model_id: str,
        blocks: tuple[int, int],
        batch_size: int,
        max_length: int,
        config: ClientConfig,
    ):
        self.session_id = uuid.uuid4().hex
        self.model_id = model_id
        self.blocks = blocks  # half-open span of blocks the session runs, (0, num_blocks) for a model
        self.batch_size = batch_size
        self.max_length = max_length
        self.position = 0
        self.failovers = 0  # hops replaced so far
        self.last_timings: list[HopTiming] = []
        self._planner = planner
        self._transport = transport
        self._health = health
        self._config = config
        self._needs = SessionNeeds(batch_size, max_length)
        self._positions = GrowingBuffer(max_length)  # [batch, position] every position id sent
        self._mask = GrowingBuffer(max_length)  # [batch, position] 0/1 padding of every position
        self._masked = False  # whether a padding mask was ever sent (then replacements need it too)
        self._failures = 0  # failovers during the current step (or the opening)
        self._failed_peers: set[str] = set()  # servers that failed the current step: not retried in it
        self._hops: list[_Hop] = []
        self._uncollected: _PushedStep | None = None
        self._hops, _ = self._open(*blocks, None)
        logger.info(
            "session open session=%s route=%s max_length=%d batch=%d",
            self.short_id,
            describe(self.route),
            max_length,
            batch_size,
        )

    @property
    def short_id(self) -> str:
        return self.session_id[:8]

    @property
    def route(self) -> list[RouteHop]:
        """The servers this session runs on now (changes when it fails over)."""
        return [hop.hop for hop in self._hops]

    # ---- stepping ----

    def step(self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Run [batch, new, hidden] through every hop; mask (or None) and positions cover the new positions."""
        hidden = hidden.to(HOST)  # the replay history lives in host memory, whatever device the head is on
        new = hidden.shape[1]
        if self.position + new > self.max_length:
            raise GenerationError(
                f"the session holds at most {self.max_length} positions; {self.position} + {new} do not fit"
            )
        step_mask = torch.ones(hidden.shape[:2], dtype=torch.long) if mask is None else mask.to(torch.long)
        masked = self._masked or mask is not None
        timings: list[HopTiming] = []
        self._failures, index = 0, 0
        self._failed_peers.clear()
        self._collect()
        if self.pushing:
            index, hidden = self._step_pushed(hidden, mask, positions, timings)
        while index < len(self._hops):
            hop = self._hops[index]
            try:
                out, timing = hop.stream.step(hidden, mask, positions)
            except ShardnetError as error:
                self._count_failure(hop.hop, error)
                replay = _Replay(
                    hop.inputs.with_tail(hidden),
                    self._mask.with_tail(step_mask) if masked else None,
                    self._positions.with_tail(positions),
                )
                replaced = self._replace(index, replay)
                timings.extend(HopTiming() for _ in range(replaced))
                hidden = replay.output[:, -new:]
                index += replaced
                continue
            hop.inputs.append(hidden)
            timings.append(timing)
            hidden = out
            index += 1
        self._positions.append(positions.to(torch.long))
        self._mask.append(step_mask)
        self._masked = masked
        self.position += new
        self.last_timings = timings
        return hidden

    def _replace(self, index: int, replay: _Replay) -> int:
        """Route hop ``index``'s blocks again and replay into the replacements (``replay.output`` is
        their last output); returns how many hops replaced it."""
        hop = self._hops[index]
        hop.stream.close()
        self._health.session_closed(hop.hop.peer_id)
        replacements, replay.output = self._open(hop.hop.start, hop.hop.end, replay)
        self._hops[index : index + 1] = replacements
        self.failovers += 1
        logger.info(
            "session=%s failed over %d:%d to %s, replayed %d positions",
            self.short_id,
            hop.hop.start,
            hop.hop.end,
            describe([r.hop for r in replacements]),
            replay.hidden.shape[1],
        )
        return len(replacements)

    @property
    def pushing(self) -> bool:
        """Whether steps go server to server: asked for, and every server of the route takes pushes."""
        return self._config.push and len(self._hops) > 1 and all(h.stream.push_token for h in self._hops)

    def _step_pushed(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        timings: list[HopTiming],
    ) -> tuple[int, torch.Tensor]:
        """Send the step to the first server, which pushes its output on along the route, and wait for the
        last server's reply only. The other servers' replies (the next hops' replay history) are read
        when the session is next used, long arrived by then. Returns the index of the first hop the plain
        loop must still run (len(hops) when the push went through) and that hop's input."""
        began = time.perf_counter()
        new = hidden.shape[1]
        streams = [hop.stream for hop in self._hops]
        route = [stream.await_push() for stream in streams[1:]]  # told before the push can reach them
        step_ids = [streams[0].send_pushing(hidden, mask, positions, route), *(e.step_id for e in route)]
        pending = _PushedStep(list(self._hops), step_ids, hidden, began)
        try:
            out, timing, _ = streams[-1].receive_step(step_ids[-1], new, began)
        except ShardnetError as error:  # find which hop it stopped at, in order
            logger.info("session=%s: pushed step got no reply from the last hop (%s)", self.short_id, error)
            return self._walk_replies(pending, timings)
        pending.timings.append(timing)
        timings.extend(pending.timings)
        self._uncollected = pending
        return len(self._hops), out

    def _walk_replies(self, pending: _PushedStep, timings: list[HopTiming]) -> tuple[int, torch.Tensor]:
        hidden, new = pending.hidden, pending.hidden.shape[1]
        for index, hop in enumerate(pending.hops):
            try:
                out, timing, push_error = hop.stream.receive_step(pending.step_ids[index], new, pending.began)
            except ShardnetError as error:
                logger.info(
                    "session=%s: pushed step got no reply from %s (%s)", self.short_id, hop.hop, error
                )
                return index, hidden
            hop.inputs.append(hidden)
            timings.append(timing)
            hidden = out
            if push_error and index + 1 < len(pending.hops):
                logger.info("session=%s: %s", self.short_id, push_error)
                return index + 1, hidden
        return len(pending.hops), hidden

    def _collect(self) -> None:
        """Read the replies of the last pushed step's hops before the last one, into the replay history.
        A hop whose reply never comes is replaced (its replay includes that step) and the next hops'
        inputs come from the replacement's output, which equals the one the push carried."""
        pending, self._uncollected = self._uncollected, None
        if pending is None:
            return
        hidden, new = pending.hidden, pending.hidden.shape[1]
        for index, hop in enumerate(pending.hops[:-1]):
            try:
                out, timing, _ = hop.stream.receive_step(pending.step_ids[index], new, pending.began)
            except ShardnetError as error:
                self._count_failure(hop.hop, error)
                replay = _Replay(
                    hop.inputs.with_tail(hidden),
                    self._mask.view() if self._masked else None,
                    self._positions.view(),
                )
                self._replace(self._hops.index(hop), replay)
                hidden = replay.output[:, -new:]
                continue
            pending.timings[index].__dict__.update(vars(timing))  # last_timings already holds these objects
            hop.inputs.append(hidden)
            hidden = out
        pending.hops[-1].inputs.append(hidden)

    # ---- what generation does between steps: beam reorders, rollbacks ----

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of every cache (the servers', the replay history) becomes old row ``rows[i]``.

        Every server applies it with the session's next step; the replay history is reordered now, so a
        replacement server rebuilds the reordered cache."""
        self._collect()
        rows = rows.to(HOST, torch.long)
        if list(rows.shape) != [self.batch_size] or int(rows.min()) < 0 or int(rows.max()) >= self.batch_size:
            raise GenerationError(
                f"reorder rows must be {self.batch_size} indices in 0..{self.batch_size - 1}"
            )
        for hop in self._hops:
            hop.stream.reorder(rows)
            hop.inputs.reorder(rows)
        self._positions.reorder(rows)
        self._mask.reorder(rows)

    def crop(self, keep: int) -> None:
        """Forget every position from ``keep`` on, in the servers' caches (with the next step) and here."""
        if not 0 <= keep <= self.position:
            raise GenerationError(f"cannot keep {keep} positions of a session holding {self.position}")
        self._collect()
        for hop in self._hops:
            hop.stream.crop(keep)
            hop.inputs.truncate(keep)
        self._positions.truncate(keep)
        self._mask.truncate(keep)
        self.position = keep

    # ---- opening and failover ----

    def _count_failure(self, hop: RouteHop, error: ShardnetError) -> None:
        """Raise what no retry can fix, or what is left after max_retries; else avoid the server a while."""
        if not error.retryable:
            raise error
        self._failures += 1
        if self._failures > self._config.max_retries:
            logger.warning(
                "session=%s gives up after %d failovers: %s", self.short_id, self._config.max_retries, error
            )
            raise error
        if not isinstance(error, SessionExpiredError):  # the server ended the session but is healthy
            self._health.report_failure(hop.peer_id, str(error))
            self._failed_peers.add(hop.peer_id)
        # Off the per-token path: look again now, so a server that announced DRAINING is passed over.
        try:
            self._planner.view.refresh(max_age_s=1.0)
        except ShardnetError as exc:
            logger.warning(
                "session=%s: swarm refresh failed, routing on the last view: %s", self.short_id, exc
            )

    def _open(self, start: int, end: int, replay: _Replay | None) -> tuple[list[_Hop], torch.Tensor | None]:
        """Open sessions covering blocks start:end, replaying into each; returns them and the last output."""
        hops: list[_Hop] = []
        reserved: list[RouteHop] = []  # hops counted as this process's sessions but not opened yet
        block, hidden = start, None if replay is None else replay.hidden
        try:
            while block < end:
                reserved = self._planner.route(
                    block, end, self._needs, reserve=True, exclude=frozenset(self._failed_peers)
                )
                while reserved:
                    route_hop = reserved[0]
                    try:
                        hop, hidden = self._open_hop(route_hop, hidden, replay)
                    except ShardnetError as error:
                        self._count_failure(route_hop, error)
                        break  # route the rest again, without the server that just failed
                    reserved.pop(0)
                    hops.append(hop)
                    block = route_hop.end
                for route_hop in reserved:
                    self._health.session_closed(route_hop.peer_id)
                reserved = []
        except BaseException:
            for route_hop in reserved:
                self._health.session_closed(route_hop.peer_id)
            for hop in hops:
                hop.stream.close()
                self._health.session_closed(hop.hop.peer_id)
            raise
        return hops, hidden

    def _open_hop(
        self, route_hop: RouteHop, hidden: torch.Tensor | None, replay: _Replay | None
    ) -> tuple[_Hop, torch.Tensor | None]:
        """Open one server's session and replay ``hidden`` into it; returns it and the replay's output."""
        config = self._config
        stream = SpanStream(
            self._transport,
            route_hop,
            self.model_id,
            self.batch_size,
            self.max_length,
            self.session_id,
            config.request_timeout_s,
        )
        inputs = GrowingBuffer(self.max_length)
        out = None
        try:
            if replay is not None:
                row_bytes = hidden.shape[0] * hidden.shape[2] * hidden.element_size()
                chunk = max(1, config.max_message_bytes // (2 * row_bytes))  # positions per message
                out = stream.step_chunked(hidden, replay.mask, replay.positions, chunk)
                inputs.append(hidden)
        except BaseException:
            stream.close()
            raise
        self._health.report_success(route_hop.peer_id)
        return _Hop(stream, inputs), out

    # ---- lifetime ----

    def close(self) -> None:
        for hop in self._hops:
            hop.stream.close()
            self._health.session_closed(hop.hop.peer_id)
        self._hops.clear()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
