"""The gRPC servicer: read requests off streams, hand each session step to ``server/step_path.py``,
answer Info, Forward, Push and Adopt. Errors map to statuses in one place.

It runs on gRPC's synchronous server: each stream has a worker thread that decodes, computes (or waits
for the compute queue, which makes compute serial and shares it fairly, chunk by chunk) and replies
(measured: a loopback round trip ~40% cheaper than grpc.aio plus an executor).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from shardnet.dht import ServerState
from shardnet.errors import (
    InvalidRequestError,
    ServerRestingError,
    ServerUnavailableError,
    SessionError,
    ShardnetError,
)
from shardnet.server.backend import SpanBackend
from shardnet.server.handoff import HandOff, adopt
from shardnet.server.push import PushSender
from shardnet.server.request_rate import RequestRate
from shardnet.server.sessions import Session, SessionTable
from shardnet.server.step_path import present_fields, serve_step, step_input
from shardnet.server.training import deep_prompts, serve_backward
from shardnet.version import __version__
from shardnet.wire import PROTOCOL_VERSION, pb, pb_grpc
from shardnet.wire.status import status_for
from shardnet.wire.tensors import serialize

if TYPE_CHECKING:
    from shardnet.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
PUSH_WAIT_S = 120.0  # how long a session awaits a pushed step before giving up on it
SERVICE_NAME = "shardnet.v1.Shard"


@dataclass
class ServerRuntime:
    """What the servicer reads: set up by the composition root, changed as the server's state changes."""

    sessions: SessionTable
    max_message_bytes: int
    quant: str = "none"  # weight-only quantization of the span (ServerConfig.quant)
    state: ServerState = ServerState.JOINING
    backend: SpanBackend | None = None  # None until the span's weights are loaded
    push: PushSender | None = None  # passes step outputs on to the next server (None: push refused)
    rate: RequestRate | None = None  # per-client rate of Info, Forward and opens (None: unlimited)
    handoff: HandOff | None = None  # gives sessions to other holders while draining (None: never)
    metrics: ServerMetrics | None = None  # counts for --metrics-port (None: not exposed)

    def admit(self, context: grpc.ServicerContext, what: str) -> None:
        if self.rate is not None:
            self.rate.admit(context.peer(), what)

    def ready_backend(self) -> SpanBackend:
        if self.state == ServerState.RESTING:
            raise ServerRestingError(
                "server is resting (its owner's headroom policy) and holds no blocks now"
            )
        if self.backend is None or self.state == ServerState.JOINING:
            raise ServerUnavailableError("server is still loading its blocks")
        if self.state != ServerState.ONLINE:
            raise ServerUnavailableError(f"server is {self.state.value} and takes no new work")
        return self.backend


class ShardServicer(pb_grpc.ShardServicer):
    def __init__(self, runtime: ServerRuntime):
        self.runtime = runtime

    def _abort(self, context: grpc.ServicerContext, error: Exception, rpc: str) -> None:
        if isinstance(error, ShardnetError):
            code, details = status_for(error)
            logger.debug("refused request: %s (%s)", details, code.name)
        else:
            logger.error("internal error while serving a request", exc_info=error)
            code, details = grpc.StatusCode.INTERNAL, f"internal server error: {type(error).__name__}"
        if self.runtime.metrics is not None:
            self.runtime.metrics.refused(rpc, code.name)
        context.abort(code, details)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        arrived = time.perf_counter()
        try:
            self.runtime.admit(context, "Info")
        except ShardnetError as error:
            self._abort(context, error, "Info")
        backend, sessions = self.runtime.backend, self.runtime.sessions
        reply = pb.InfoResponse(
            protocol_version=PROTOCOL_VERSION,
            shardnet_version=__version__,
            max_message_bytes=self.runtime.max_message_bytes,
            cache_tokens_total=sessions.max_cache_tokens,
            cache_tokens_free=sessions.cache_tokens_free,
            open_sessions=len(sessions),
            sessions_served=sessions.sessions_served,
            state=self.runtime.state.value,
            quant=self.runtime.quant,
        )
        if backend is not None:
            limits = backend.limits
            reply.model_id = limits.model_id
            reply.span.start, reply.span.end = limits.start, limits.end
            reply.dtype = str(backend.dtype).removeprefix("torch.")
            reply.max_batch_size = limits.max_batch_size
            reply.max_length = limits.max_length
            reply.hidden_size = limits.hidden_size
            reply.decode_batches = backend.compute.batches_run
            reply.decode_steps_batched = backend.compute.steps_batched
            if backend.prefix is not None:
                reply.prefix_hits = backend.prefix.hits
                reply.prefix_tokens_reused = backend.prefix.tokens_reused
                reply.prefix_cache_tokens_used = backend.prefix.tokens_used
                reply.prefix_cache_tokens_total = backend.prefix.max_tokens
        reply.arrived_at_s, reply.replied_at_s = arrived, time.perf_counter()
        return reply

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        try:
            self.runtime.admit(context, "Forward")
            backend = self.runtime.ready_backend()
            backend.check_model(request.model_id)
            backend.check_span(request.span.start, request.span.end)
            step = step_input(
                request.hidden_states, request.attention_mask, request.position_ids, present_fields(request)
            )
            batch, length = step.hidden_states.shape[:2] if step.hidden_states.dim() == 3 else (0, 0)
            backend.check_session_shape(batch, length)
            backend.check_step(step, batch, 0, length)
            blocks = request.span.end - request.span.start
            prompts = deep_prompts(request, present_fields(request), blocks, step.hidden_states)
            backend.check_adapter(request.adapter)
            out, compute_s = backend.forward(
                step, request.span.start, request.span.end, prompts, request.adapter
            )
            if self.runtime.metrics is not None:
                self.runtime.metrics.stateless_call("Forward")
            return pb.ForwardResponse(hidden_states=serialize(out), compute_s=compute_s)
        except Exception as error:  # every failure becomes a status; the server keeps serving
            self._abort(context, error, "Forward")

    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardResponse:
        try:
            self.runtime.admit(context, "Backward")
            reply = serve_backward(self.runtime.ready_backend(), request)
            if self.runtime.metrics is not None:
                self.runtime.metrics.stateless_call("Backward")
            return reply
        except Exception as error:  # every failure becomes a status; the server keeps serving
            self._abort(context, error, "Backward")

    def Inference(
        self, request_iterator: Iterator[pb.InferenceRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.InferenceResponse]:
        session: Session | None = None
        try:
            for request in request_iterator:
                arrived = time.perf_counter()
                kind = request.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        raise SessionError("this stream already has an open session")
                    session = self._open(request.open, context)
                    yield pb.InferenceResponse(
                        opened=pb.SessionOpened(
                            session_id=session.session_id,
                            cache_tokens=session.cache_tokens,
                            push_token=session.push_token,
                            arrived_at_s=arrived,
                            replied_at_s=time.perf_counter(),
                        )
                    )
                elif kind in ("step", "await_push"):
                    if session is None:
                        raise SessionError("step before OpenSession: open a session first on this stream")
                    if kind == "step":
                        step = request.step
                    else:
                        arrived, pushed = self._pushed(session, request.await_push, context)
                        if pushed.abort:  # nothing came, or the route broke before: nothing computed
                            yield pb.InferenceResponse(
                                step=pb.StepResult(step_id=pushed.step.step_id, push_error=pushed.abort)
                            )
                            continue
                        step = pushed.step
                    moved = self._hand_off(session)
                    if moved is not None:  # nothing computed here: the client sends the step there
                        yield pb.InferenceResponse(step=pb.StepResult(step_id=step.step_id, moved=moved))
                        return
                    runtime = self.runtime
                    reply = serve_step(
                        runtime.backend, runtime.sessions, runtime.push, session, step, arrived
                    )
                    if runtime.metrics is not None:
                        runtime.metrics.step_served(step, reply)
                    yield reply
                else:
                    raise InvalidRequestError("empty InferenceRequest: set open or step")
        except grpc.RpcError:  # the client went away mid-stream: nothing to answer
            pass
        except Exception as error:  # every failure becomes a status; the server keeps serving
            self._abort(context, error, "Inference")
        finally:
            if session is not None:
                self.runtime.sessions.close(session)

    def _hand_off(self, session: Session) -> pb.Moved | None:
        """While draining, give the session to another holder instead of running its next step."""
        runtime = self.runtime
        if runtime.state != ServerState.DRAINING or runtime.handoff is None or runtime.backend is None:
            return None
        try:
            moved = runtime.handoff.hand_off(session, runtime.backend)
        except Exception:  # the step runs here instead; replay stays the client's fallback
            logger.exception("hand-off of session=%s failed", session.short_id)
            return None
        if moved is not None:
            self.runtime.sessions.close(session)
        return moved

    def _open(self, request: pb.OpenSession, context: grpc.ServicerContext) -> Session:
        self.runtime.admit(context, "opening a session")
        backend = self.runtime.ready_backend()
        backend.check_model(request.model_id)
        backend.check_span(request.span.start, request.span.end)
        backend.check_session_shape(request.batch_size, request.max_length)
        backend.check_adapter(request.adapter)
        if request.adopt_token:
            session = self.runtime.sessions.claim(
                request.adopt_token, cancel=context.cancel, client=context.peer()
            )
            described = (session.start, session.end, session.batch_size, session.max_length)
            if described != (request.span.start, request.span.end, request.batch_size, request.max_length):
                self.runtime.sessions.close(session)
                raise InvalidRequestError("the session handed over here has another span or shape")
            return session
        return self.runtime.sessions.open(
            request.span.start,
            request.span.end,
            request.batch_size,
            request.max_length,
            backend.span.new_cache(),
            request.session_id,
            cancel=context.cancel,  # lets the idle reaper end this stream
            client=context.peer(),  # one connection: the unit of the per-client quotas
            adapter=request.adapter,
        )

    def _pushed(
        self, session: Session, wait: pb.AwaitPush, context: grpc.ServicerContext
    ) -> tuple[float, pb.PushRequest]:
        """The step ``wait.step_id`` pushed to this session (older, stale pushes are dropped), with when it
        arrived (``time.perf_counter()``). When none comes in time, an abort: the client hears the step
        was not computed here, and sends it itself. A client that went away (it replaced this hop) ends
        the wait within a second."""
        deadline = time.monotonic() + PUSH_WAIT_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                arrived, pushed = session.inbox.get(timeout=min(max(remaining, 0.0), 1.0))
            except queue.Empty:
                if not context.is_active():
                    raise SessionError(f"session {session.short_id}: the client closed its stream") from None
                if remaining > 1.0:
                    continue
                reason = f"step {wait.step_id} was never pushed within {PUSH_WAIT_S:g}s"
                return time.perf_counter(), pb.PushRequest(step=pb.Step(step_id=wait.step_id), abort=reason)
            if pushed.step.step_id == wait.step_id:
                return arrived, pushed
            if pushed.step.step_id > wait.step_id:
                raise SessionError(f"pushed step {pushed.step.step_id} while waiting for step {wait.step_id}")

    def Adopt(
        self, request_iterator: Iterator[pb.AdoptRequest], context: grpc.ServicerContext
    ) -> pb.AdoptReply:
        try:
            self.runtime.admit(context, "adopting a session")
            backend = self.runtime.ready_backend()
            return pb.AdoptReply(adopt_token=adopt(request_iterator, backend, self.runtime.sessions))
        except Exception as error:  # every failure becomes a status; the server keeps serving
            self._abort(context, error, "Adopt")

    def Push(self, request: pb.PushRequest, context: grpc.ServicerContext) -> pb.PushAck:
        try:  # a draining server still takes its open sessions' steps (to run or to hand over)
            arrived = time.perf_counter()
            session = self.runtime.sessions.pushed_to(request.push_token)
            session.inbox.put((arrived, request))
            return pb.PushAck(arrived_at_s=arrived)
        except Exception as error:  # every failure becomes a status; the server keeps serving
            self._abort(context, error, "Push")


# ---- registration: a request that does not decode is INVALID_ARGUMENT ----


@dataclass(frozen=True)
class _Undecodable:
    reason: str


def _lenient(message_type):
    """A deserializer that never raises: gRPC answers a deserializer's exception with INTERNAL, which
    would blame the server for a client's garbage."""

    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return _Undecodable(f"the {message_type.__name__} message does not decode: {exc}")

    return parse


def _unary(behavior):
    def handle(request, context: grpc.ServicerContext):
        if isinstance(request, _Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return behavior(request, context)

    return handle


def _decoded(requests: Iterator) -> Iterator:
    for request in requests:
        if isinstance(request, _Undecodable):
            raise InvalidRequestError(request.reason)
        yield request


def add_to_server(servicer: ShardServicer, server: grpc.Server) -> None:
    """Register ``servicer`` like the generated ``add_ShardServicer_to_server``, with lenient decoding."""
    unary = (
        ("Info", pb.InfoRequest, pb.InfoResponse),
        ("Forward", pb.ForwardRequest, pb.ForwardResponse),
        ("Push", pb.PushRequest, pb.PushAck),
        ("Backward", pb.BackwardRequest, pb.BackwardResponse),
    )
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _unary(getattr(servicer, name)),
            request_deserializer=_lenient(request),
            response_serializer=response.SerializeToString,
        )
        for name, request, response in unary
    }
    handlers["Adopt"] = grpc.stream_unary_rpc_method_handler(
        lambda requests, context: servicer.Adopt(_decoded(requests), context),
        request_deserializer=_lenient(pb.AdoptRequest),
        response_serializer=pb.AdoptReply.SerializeToString,
    )
    handlers["Inference"] = grpc.stream_stream_rpc_method_handler(
        lambda requests, context: servicer.Inference(_decoded(requests), context),
        request_deserializer=_lenient(pb.InferenceRequest),
        response_serializer=pb.InferenceResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
