"""Inference sessions: one stream per hop (SpanStream) and the chain over a route (InferenceSession)."""

from __future__ import annotations

import logging
import queue
import time
import uuid
from dataclasses import dataclass

import grpc
import torch

from shardnet.client.routing import RouteHop
from shardnet.client.transport import Transport
from shardnet.errors import RemoteError, ShardnetError
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


def _optional_tensors(mask: torch.Tensor | None, positions: torch.Tensor | None, limit: int) -> dict:
    fields = {}
    if mask is not None:
        fields["attention_mask"] = serialize(mask.to(torch.int64), limit)
    if positions is not None:
        fields["position_ids"] = serialize(positions.to(torch.int64), limit)
    return fields


class SpanStream:
    """One bidirectional stream to one server, holding that server's KV cache for blocks start:end."""

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
        self.position = 0
        self._limit = transport.max_message_bytes
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._step_id = 0
        self._call = transport.stub(hop.server.address).Inference(
            iter(self._requests.get, _END), timeout=timeout_s
        )
        span = pb.Span(start=hop.start, end=hop.end)
        opened = self._exchange(
            pb.InferenceRequest(
                open=pb.OpenSession(
                    model_id=model_id,
                    span=span,
                    max_length=max_length,
                    batch_size=batch_size,
                    session_id=session_id,
                )
            )
        )
        if opened.WhichOneof("kind") != "opened":
            raise RemoteError(f"{self.peer}: expected SessionOpened, got {opened.WhichOneof('kind')}")

    def _exchange(self, request: pb.InferenceRequest) -> pb.InferenceResponse:
        self._requests.put(request)
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.peer) from None
        except StopIteration:
            raise RemoteError(f"{self.peer}: stream ended without a reply") from None

    def step(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, HopTiming]:
        """Send the new positions' hidden states [batch, new, hidden]; returns (output, where time went)."""
        began = time.perf_counter()
        self._step_id += 1
        step = pb.Step(
            step_id=self._step_id,
            position=self.position,
            hidden_states=serialize(hidden, self._limit),
            **_optional_tensors(mask, positions, self._limit),
        )
        request = pb.InferenceRequest(step=step)
        sent = time.perf_counter()
        reply = self._exchange(request)
        received = time.perf_counter()
        result = reply.step
        if reply.WhichOneof("kind") != "step" or result.step_id != self._step_id:
            raise RemoteError(f"{self.peer}: reply does not answer step {self._step_id}")
        self.position += hidden.shape[1]
        out = deserialize(result.hidden_states)
        done = time.perf_counter()
        timing = HopTiming(
            total_s=done - began,
            server_compute_s=result.compute_s,
            client_s=(sent - began) + (done - received),
            server_handle_s=max(result.handle_s, result.compute_s),  # an older server reports no handle_s
        )
        return out, timing

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()


class InferenceSession:
    """A chain of SpanStreams over a route; every step goes through each hop in order."""

    def __init__(
        self,
        transport: Transport,
        route: list[RouteHop],
        model_id: str,
        batch_size: int,
        max_length: int,
        timeout_s: float,
    ):
        self.session_id = uuid.uuid4().hex
        self.batch_size = batch_size
        self.max_length = max_length
        self.position = 0
        self.last_timings: list[HopTiming] = []
        self._streams: list[SpanStream] = []
        try:
            for hop in route:
                self._streams.append(
                    SpanStream(transport, hop, model_id, batch_size, max_length, self.session_id, timeout_s)
                )
        except ShardnetError:
            self.close()
            raise
        logger.info(
            "session open session=%s hops=%d max_length=%d", self.session_id[:8], len(route), max_length
        )

    def step(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> torch.Tensor:
        """Run [batch, new, hidden] through every hop; mask/positions cover the new positions only."""
        timings = []
        for stream in self._streams:
            hidden, timing = stream.step(hidden, mask, positions)
            timings.append(timing)
        self.position += hidden.shape[1]
        self.last_timings = timings
        return hidden

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams.clear()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def forward_chain(
    transport: Transport,
    route: list[RouteHop],
    model_id: str,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    timeout_s: float,
) -> torch.Tensor:
    """Run full sequences through every hop with the unary Forward RPC (no cache)."""
    limit = transport.max_message_bytes
    extra = _optional_tensors(mask, positions, limit)
    for hop in route:
        peer = f"{hop.server.short_id}@{hop.server.address}"
        request = pb.ForwardRequest(
            model_id=model_id,
            span=pb.Span(start=hop.start, end=hop.end),
            hidden_states=serialize(hidden, limit),
            **extra,
        )
        try:
            reply = transport.stub(hop.server.address).Forward(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, peer) from None
        hidden = deserialize(reply.hidden_states)
    return hidden
