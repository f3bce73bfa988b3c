"""SpanStream: one bidirectional stream to one server, holding its KV cache for one hop of a session.

The stream has no gRPC deadline (a conversation may stay open for hours); its replies are read by a thread
onto the session's ``ReplyBoard``, and each wait for one has a deadline of the caller's choosing (the
step's hedge budget). Failures come out as the typed errors of ``shardnet.wire.status``; deciding what to
do about them is the failover policy's job (``client/failover.py``).
"""

from __future__ import annotations

import logging
import queue
import time

import grpc
import torch

from shardnet.client.failover import RECENT_SMOOTHING
from shardnet.client.replies import STREAM_ENDED, Posted, ReplyBoard
from shardnet.client.routing import RouteHop
from shardnet.client.timings import ChainClock, HopTiming
from shardnet.client.transport import Transport
from shardnet.errors import RemoteError, StepTimeoutError
from shardnet.wire import pb
from shardnet.wire.clock_offset import ClockOffset
from shardnet.wire.push_ack import push_ack_timeout_s
from shardnet.wire.status import error_from_rpc
from shardnet.wire.tensors import deserialize, serialize

logger = logging.getLogger(__name__)
_END = None  # put on a request queue to half-close its stream


def optional_tensors(mask: torch.Tensor | None, positions: torch.Tensor | None, limit: int) -> dict:
    """The optional Step/Forward fields for a padding mask and position ids, when given."""
    fields = {}
    if mask is not None:
        fields["attention_mask"] = serialize(mask.to(torch.int64), limit)
    if positions is not None:
        fields["position_ids"] = serialize(positions.to(torch.int64), limit)
    return fields


class NotPushedError(RemoteError):
    """The server answered an awaited step without computing it: the push never reached it (it gave up
    waiting, or the server before told it the route broke). It takes the step as a plain one instead."""


class SessionMovedError(RemoteError):
    """The server drains and handed the session to another holder (``moved``); nothing was computed."""

    def __init__(self, message: str, moved: pb.Moved):
        super().__init__(message)
        self.moved = moved


class SpanStream:
    """An open session on one server for blocks ``hop.start:hop.end``."""

    def __init__(
        self,
        transport: Transport,
        hop: RouteHop,
        model_id: str,
        batch_size: int,
        max_length: int,
        session_id: str,
        open_timeout_s: float,
        board: ReplyBoard | None = None,
        adopt_token: bytes = b"",
        adapter: str = "",
        clock: ClockOffset | None = None,
    ):
        """``adopt_token``: take over a session another server handed over here (see ``SessionMovedError``)
        instead of opening an empty one."""
        self.hop = hop
        self.peer = f"{hop.server.short_id}@{hop.server.address}"
        self.position = 0  # positions in this server's cache, after any rollback still to send
        self.pending_rows: torch.Tensor | None = (
            None  # [batch] reorder the server applies before the next step
        )
        self.recent_s: float | None = None  # moving average of the server's seconds per position
        self.board = board or ReplyBoard()
        self.clock = clock or ClockOffset()  # the server's clock against this process's (step timings)
        self._limit = transport.max_message_bytes
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._step_id = 0
        self.push_token = b""
        self.awaiting: int | None = None  # step id the server awaits as a push (push mode), if any
        self._stub = transport.stub(hop.server.address, hop.server.record.tls_fingerprint)
        self._call = self._stub.Inference(iter(self._requests.get, _END))
        self.board.read(self, self._call)
        try:
            opening = time.perf_counter()
            self._requests.put(
                pb.InferenceRequest(
                    open=pb.OpenSession(
                        model_id=model_id,
                        span=pb.Span(start=hop.start, end=hop.end),
                        max_length=max_length,
                        batch_size=batch_size,
                        session_id=session_id,
                        adopt_token=adopt_token,
                        adapter=adapter,
                    )
                )
            )
            posted = self._next_posted(time.monotonic() + open_timeout_s)
            opened = self.reply_of(posted.item)
            if opened.WhichOneof("kind") != "opened":
                raise RemoteError(f"{self.peer}: expected SessionOpened, got {opened.WhichOneof('kind')}")
            self.clock.add(opening, opened.opened.arrived_at_s, opened.opened.replied_at_s, posted.arrived)
            self.push_token = opened.opened.push_token  # empty from a server that takes no pushes
        except BaseException:
            self.close()
            raise

    def receive(self, deadline: float) -> pb.InferenceResponse:
        """The next reply, waiting until ``deadline`` (``time.monotonic()``)."""
        return self.reply_of(self._next_posted(deadline).item)

    def _next_posted(self, deadline: float) -> Posted:
        posted = self.board.wait([self], deadline)
        if posted is None:
            raise StepTimeoutError(f"{self.peer}: no reply within its budget")
        return posted

    def reply_of(self, item: object) -> pb.InferenceResponse:
        """What the board posted for this stream, as a reply or a typed error."""
        if isinstance(item, grpc.RpcError):
            raise error_from_rpc(item, self.peer)
        if item is STREAM_ENDED:
            raise RemoteError(f"{self.peer}: stream ended without a reply")
        return item

    def reorder(self, rows: torch.Tensor) -> None:
        """Reorder the server's cache rows (row i becomes row ``rows[i]``) with the next step."""
        self.pending_rows = rows if self.pending_rows is None else self.pending_rows[rows]

    def crop(self, keep: int) -> None:
        """Keep only the server cache's first ``keep`` positions, from the next step on."""
        self.position = min(self.position, keep)

    def build_step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        push: list[pb.NextHop] = (),
    ) -> pb.Step:
        """The step this stream's server is to run next: the awaited one, or a new one."""
        if self.awaiting is None:
            self._step_id += 1
        step = pb.Step(
            step_id=self.awaiting or self._step_id,
            position=self.position,
            hidden_states=serialize(hidden, self._limit),
            **optional_tensors(mask, positions, self._limit),
        )
        if self.pending_rows is not None:
            step.hypo_ids.CopyFrom(serialize(self.pending_rows.to(torch.int64), self._limit))
        step.push.extend(push)
        return step

    def send(self, step: pb.Step) -> None:
        """Send ``step`` (from ``build_step``): on the stream, or, when the server awaits it as a push
        that the server before did not make, as that push."""
        if self.awaiting is None:
            self._requests.put(pb.InferenceRequest(step=step))
            return
        request = pb.PushRequest(push_token=self.push_token, step=step)
        try:
            self._stub.Push(request, timeout=push_ack_timeout_s(request.ByteSize()))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.peer) from None

    def step(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, budget_s: float
    ) -> tuple[torch.Tensor, HopTiming]:
        """Send the new positions' hidden states [batch, new, hidden] and wait up to ``budget_s`` for the
        output; returns (output, where time went). A pending reorder or rollback travels with the step,
        so it costs no round trip of its own."""
        began = time.perf_counter()
        step = self.build_step(hidden, mask, positions)
        self.send(step)
        sent = time.perf_counter()
        deadline = time.monotonic() + budget_s
        while True:
            posted = self._next_posted(deadline)
            result = self.step_result(self.reply_of(posted.item), step.step_id)
            if result is not None:
                break
        out = self.accept(result, hidden.shape[1])
        timing = self.new_timing()
        clock = ChainClock([timing], began, [self.clock], lambda peer_id: None)  # its own round trip is here
        clock.sent(0, sent)
        clock.answered(0, result, posted.arrived, time.perf_counter())
        return out, timing

    def new_timing(self) -> HopTiming:
        """This hop's share of a step, not known yet."""
        return HopTiming(span=f"{self.hop.start}:{self.hop.end}", peer_id=self.hop.peer_id)

    # ---- push mode: the server before this one sends the step, this stream only gets the reply ----

    def await_push(self) -> pb.NextHop:
        """Tell the server its next step comes from the server before it; returns that step's route entry."""
        self._step_id += 1
        self.awaiting = self._step_id
        self._requests.put(pb.InferenceRequest(await_push=pb.AwaitPush(step_id=self._step_id)))
        hop = pb.NextHop(
            address=self.hop.server.address,
            push_token=self.push_token,
            step_id=self._step_id,
            position=self.position,
        )
        if self.pending_rows is not None:
            hop.hypo_ids.CopyFrom(serialize(self.pending_rows.to(torch.int64), self._limit))
        return hop

    def step_result(self, reply: pb.InferenceResponse, step_id: int) -> pb.StepResult | None:
        """``reply`` as the answer to step ``step_id``; None for an older step's (a late duplicate)."""
        if reply.WhichOneof("kind") != "step" or reply.step.step_id > step_id:
            raise RemoteError(f"{self.peer}: reply does not answer step {step_id}")
        if reply.step.step_id < step_id:
            return None
        if reply.step.HasField("moved"):
            self.awaiting = None
            moved = reply.step.moved
            raise SessionMovedError(f"{self.peer}: drains; the session moved to {moved.address}", moved)
        if not reply.step.HasField("hidden_states"):  # the push never reached it: nothing computed
            self.awaiting = None
            raise NotPushedError(f"{self.peer}: step {step_id} was not pushed here: {reply.step.push_error}")
        return reply.step

    def accept(self, result: pb.StepResult, new: int) -> torch.Tensor:
        """The output [batch, new, hidden] of a step this server answered; its cache now holds ``new``
        more positions."""
        self.position += new
        self.pending_rows = None
        self.awaiting = None
        out = deserialize(result.hidden_states)
        handle_s = max(result.handle_s, result.compute_s)  # an older server reports no handle_s
        per_position = handle_s / max(new, 1)
        if self.recent_s is None:
            self.recent_s = per_position
        else:
            self.recent_s += RECENT_SMOOTHING * (per_position - self.recent_s)
        return out

    def step_chunked(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        max_positions: int,
        budget_s,
    ) -> torch.Tensor:
        """Send many positions as several steps of at most ``max_positions`` each (a replay, a long
        prompt); ``budget_s(positions)`` is each chunk's time budget."""
        outputs = []
        for first in range(0, hidden.shape[1], max_positions):
            last = first + max_positions
            chunk_mask = None if mask is None else mask[:, first:last]
            chunk = hidden[:, first:last]
            out, _ = self.step(chunk, chunk_mask, positions[:, first:last], budget_s(chunk.shape[1]))
            outputs.append(out)
        return torch.cat(outputs, dim=1)  # [batch, positions, hidden]

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()
        self.board.forget(self)
