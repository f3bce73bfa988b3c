"""SpanStream: one bidirectional stream to one server, holding its KV cache for one hop of a session.

The stream has no gRPC deadline (a conversation may stay open for hours); each request gets the
per-request timeout through ``StepDeadlines`` instead. Failures come out as the typed errors of
``shardnet.wire.status``; deciding what to do about them is the session's job.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass

import grpc
import torch

from shardnet.client.deadlines import StepDeadlines
from shardnet.client.routing import RouteHop
from shardnet.client.transport import Transport
from shardnet.errors import RemoteError, StepTimeoutError
from shardnet.wire import pb
from shardnet.wire.status import error_from_rpc
from shardnet.wire.tensors import deserialize, serialize

logger = logging.getLogger(__name__)
_END = None  # put on a request queue to half-close its stream


@dataclass
class HopTiming:
    """Where one step's time went on one hop, in seconds."""

    total_s: float = 0.0  # client encode start -> reply decoded
    server_compute_s: float = 0.0  # the server's own report of running its blocks
    client_s: float = 0.0  # encoding the request and decoding the reply on the client
    server_handle_s: float = 0.0  # the server's report: request decoded -> reply encoded, with compute

    @property
    def server_io_s(self) -> float:
        """Server-side checks, decode and encode around the compute."""
        return max(self.server_handle_s - self.server_compute_s, 0.0)

    @property
    def wire_s(self) -> float:
        """The rest: gRPC on both sides (threads, HTTP/2, protobuf bytes) and the network."""
        return max(self.total_s - self.server_handle_s - self.client_s, 0.0)


def optional_tensors(mask: torch.Tensor | None, positions: torch.Tensor | None, limit: int) -> dict:
    """The optional Step/Forward fields for a padding mask and position ids, when given."""
    fields = {}
    if mask is not None:
        fields["attention_mask"] = serialize(mask.to(torch.int64), limit)
    if positions is not None:
        fields["position_ids"] = serialize(positions.to(torch.int64), limit)
    return fields


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
        timeout_s: float,
    ):
        self.hop = hop
        self.peer = f"{hop.server.short_id}@{hop.server.address}"
        self.position = 0  # positions in this server's cache, after any rollback still to send
        self.pending_rows: torch.Tensor | None = (
            None  # [batch] reorder the server applies before the next step
        )
        self.timeout_s = timeout_s
        self._limit = transport.max_message_bytes
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._step_id = 0
        self._timed_out = False
        self._deadlines = StepDeadlines.shared()
        self.push_token = b""
        self.awaiting: int | None = None  # step id the server awaits as a push (push mode), if any
        self._stub = transport.stub(hop.server.address, hop.server.record.tls_fingerprint)
        self._call = self._stub.Inference(iter(self._requests.get, _END))
        try:
            opened = self._exchange(
                pb.InferenceRequest(
                    open=pb.OpenSession(
                        model_id=model_id,
                        span=pb.Span(start=hop.start, end=hop.end),
                        max_length=max_length,
                        batch_size=batch_size,
                        session_id=session_id,
                    )
                )
            )
            if opened.WhichOneof("kind") != "opened":
                raise RemoteError(f"{self.peer}: expected SessionOpened, got {opened.WhichOneof('kind')}")
            self.push_token = opened.opened.push_token  # empty from a server that takes no pushes
        except BaseException:
            self.close()
            raise

    def _expire(self) -> None:
        self._timed_out = True
        self._call.cancel()

    def _exchange(self, request: pb.InferenceRequest) -> pb.InferenceResponse:
        self._requests.put(request)
        return self._receive()

    def _receive(self) -> pb.InferenceResponse:
        self._deadlines.arm(self, self.timeout_s, self._expire)
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            if self._timed_out:
                raise StepTimeoutError(f"{self.peer}: no reply within {self.timeout_s:g}s") from None
            raise error_from_rpc(exc, self.peer) from None
        except StopIteration:
            raise RemoteError(f"{self.peer}: stream ended without a reply") from None
        finally:
            self._deadlines.disarm(self)

    def reorder(self, rows: torch.Tensor) -> None:
        """Reorder the server's cache rows (row i becomes row ``rows[i]``) with the next step."""
        self.pending_rows = rows if self.pending_rows is None else self.pending_rows[rows]

    def crop(self, keep: int) -> None:
        """Keep only the server cache's first ``keep`` positions, from the next step on."""
        self.position = min(self.position, keep)

    def _build_step(
        self, step_id: int, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> pb.Step:
        step = pb.Step(
            step_id=step_id,
            position=self.position,
            hidden_states=serialize(hidden, self._limit),
            **optional_tensors(mask, positions, self._limit),
        )
        if self.pending_rows is not None:
            step.hypo_ids.CopyFrom(serialize(self.pending_rows.to(torch.int64), self._limit))
        return step

    def step(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, HopTiming]:
        """Send the new positions' hidden states [batch, new, hidden]; returns (output, where time went).

        A pending reorder or rollback travels with the step, so it costs no round trip of its own. If the
        server awaits a pushed step that never came, the step is pushed to it by the client instead."""
        began = time.perf_counter()
        if self._timed_out:  # cancelled by an earlier timeout: fail now, not after another one
            raise StepTimeoutError(f"{self.peer}: no reply within {self.timeout_s:g}s")
        if self.awaiting is not None:
            step_id = self.awaiting
            step = self._build_step(step_id, hidden, mask, positions)
            self._deliver(step)
        else:
            self._step_id += 1
            step_id = self._step_id
            self._requests.put(pb.InferenceRequest(step=self._build_step(step_id, hidden, mask, positions)))
        sent = time.perf_counter()
        out, timing, _ = self.receive_step(step_id, hidden.shape[1], began)
        timing.client_s += sent - began  # encoding the request
        return out, timing

    def _deliver(self, step: pb.Step) -> None:
        """Push ``step`` to the server ourselves (it awaits a push the server before it did not make)."""
        try:
            self._stub.Push(pb.PushRequest(push_token=self.push_token, step=step), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.peer) from None

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

    def send_pushing(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, push: list[pb.NextHop]
    ) -> int:
        """Send a step whose output the server pushes along ``push``; returns its step id."""
        self._step_id += 1
        step = self._build_step(self._step_id, hidden, mask, positions)
        step.push.extend(push)
        self._requests.put(pb.InferenceRequest(step=step))
        return self._step_id

    def receive_step(self, step_id: int, new: int, began: float) -> tuple[torch.Tensor, HopTiming, str]:
        """The reply to step ``step_id`` (older replies are skipped): (output, timing, push error or "")."""
        while True:
            reply = self._receive()
            if reply.WhichOneof("kind") != "step" or reply.step.step_id > step_id:
                raise RemoteError(f"{self.peer}: reply does not answer step {step_id}")
            if reply.step.step_id == step_id:
                break
        received = time.perf_counter()
        result = reply.step
        self.awaiting = None
        if not result.HasField("hidden_states"):  # the push never reached this server: nothing computed
            raise RemoteError(f"{self.peer}: step {step_id} was not pushed here: {result.push_error}")
        self.position += new
        self.pending_rows = None
        self.awaiting = None
        out = deserialize(result.hidden_states)
        done = time.perf_counter()
        timing = HopTiming(
            total_s=done - began,
            server_compute_s=result.compute_s,
            client_s=done - received,
            server_handle_s=max(result.handle_s, result.compute_s),  # an older server reports no handle_s
        )
        return out, timing, result.push_error

    def step_chunked(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, max_positions: int
    ) -> torch.Tensor:
        """Send many positions as several steps of at most ``max_positions`` each (a replay, a long prompt)."""
        outputs = []
        for first in range(0, hidden.shape[1], max_positions):
            last = first + max_positions
            chunk_mask = None if mask is None else mask[:, first:last]
            out, _ = self.step(hidden[:, first:last], chunk_mask, positions[:, first:last])
            outputs.append(out)
        return torch.cat(outputs, dim=1)  # [batch, positions, hidden]

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()
