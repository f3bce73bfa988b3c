"""KV hand-off: a draining server gives each session's KV cache to another holder of its blocks.

On SIGTERM a server drains: it takes no new sessions and serves its open ones up to ``--drain-timeout``.
With hand-off, the next step of each open session is not computed here. Instead the server:
- finds another ONLINE server of the same model, dtype and quantization whose span covers the
  session's blocks and whose free cache fits it, in its copy of the DHT;
- streams it the session (``Adopt``): one message per block's keys and values, over the same pinned,
  signed channel a push uses;
- answers the step with ``StepResult.moved``: the new server's address, peer id and adoption token.

The client opens the session there with that token and sends the step again. No history is replayed.
If no holder takes the session, the step is computed here as before, and replay stays the client's
fallback once the drain ends.

The receiving side (``adopt``) trusts nothing it is sent. The model, the span, the shapes against its
own limits, the dtype, finite values, and every block present once are all checked. The session then
counts against its cache budget like any other. A session nobody claims within ``ADOPT_CLAIM_S`` is
closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import grpc
import torch

from shardnet.dht import ServerState, ServerView
from shardnet.errors import InvalidRequestError
from shardnet.server.backend import SpanBackend
from shardnet.server.sessions import Session, SessionTable
from shardnet.wire import PROTOCOL_VERSION, pb, pb_grpc
from shardnet.wire.call_auth import CallSigner
from shardnet.wire.channels import server_channel
from shardnet.wire.push_ack import push_ack_timeout_s
from shardnet.wire.tensors import FLOAT_DTYPES, check_finite, deserialize, serialize

logger = logging.getLogger(__name__)
ADOPT_CLAIM_S = 60.0  # an adopted session its client has not opened by then is closed


class HandOff:
    """The sending side: hands one session at a time to the best other holder of its blocks."""

    def __init__(
        self,
        holders: Callable[[], list[ServerView]],
        own_peer_id: str,
        dtype: str,
        quant: str,
        channel_options: list[tuple[str, int]],
        signer: CallSigner | None = None,
    ):
        self._holders = holders  # every server of this model in the DHT now (a look-up)
        self._own_peer_id = own_peer_id
        self._dtype = dtype
        self._quant = quant
        self._options = channel_options
        self._signer = signer
        self.handed_off = 0  # sessions handed over so far

    def candidates(self, session: Session) -> list[ServerView]:
        """Servers that can take ``session`` exactly: most free cache first."""
        if session.adapter:  # an adopted session runs without one: its client replays it instead
            return []
        seen, usable = set(), []
        for view in self._holders():
            record = view.record
            if record.peer_id in seen or record.peer_id == self._own_peer_id:
                continue
            seen.add(record.peer_id)
            if (
                record.state == ServerState.ONLINE.value
                and record.start <= session.start
                and record.end >= session.end
                and record.dtype == self._dtype
                and record.quant == self._quant
                and record.protocol == PROTOCOL_VERSION
                and record.cache_tokens_free >= session.cache_tokens
            ):
                usable.append(view)
        return sorted(usable, key=lambda view: -view.record.cache_tokens_free)

    def hand_off(self, session: Session, backend: SpanBackend) -> pb.Moved | None:
        """Give ``session`` to another holder; returns where it went, or None if nobody took it."""
        began = time.perf_counter()
        requests = list(_adopt_requests(session, backend))
        size = sum(request.ByteSize() for request in requests)
        for view in self.candidates(session):
            channel = server_channel(view.address, self._options, view.record.tls_fingerprint, self._signer)
            try:
                reply = pb_grpc.ShardStub(channel).Adopt(iter(requests), timeout=2 * push_ack_timeout_s(size))
            except grpc.RpcError as exc:
                logger.info(
                    "hand-off of session=%s to %s refused: %s",
                    session.short_id,
                    view.address,
                    exc.code().name,
                )
                continue
            finally:
                channel.close()
            self.handed_off += 1
            logger.info(
                "handed session=%s (%d positions, %.1f MiB) to %s in %.3fs",
                session.short_id,
                session.position,
                size / 2**20,
                view.address,
                time.perf_counter() - began,
            )
            return pb.Moved(address=view.address, peer_id=view.record.peer_id, adopt_token=reply.adopt_token)
        return None


def _adopt_requests(session: Session, backend: SpanBackend) -> Iterator[pb.AdoptRequest]:
    first = pb.AdoptRequest(
        open=pb.OpenSession(
            model_id=backend.limits.model_id,
            span=pb.Span(start=session.start, end=session.end),
            max_length=session.max_length,
            batch_size=session.batch_size,
            session_id=session.session_id,
        ),
        position=session.position,
    )
    if session.attention_mask is not None:
        first.attention_mask.CopyFrom(serialize(session.attention_mask.to(torch.int64)))
    if session.position == 0:  # nothing cached yet: the description is all there is
        yield first
        return
    layers = backend.span.export_cache(session.cache, session.start, session.end)
    for offset, (keys, values, seen) in enumerate(layers):
        message = first if offset == 0 else pb.AdoptRequest()
        message.layer = session.start + offset
        message.keys.CopyFrom(serialize(keys.contiguous()))
        message.values.CopyFrom(serialize(values.contiguous()))
        message.seen = seen
        yield message


def adopt(requests: Iterator[pb.AdoptRequest], backend: SpanBackend, sessions: SessionTable) -> bytes:
    """The receiving side: check what a draining server sent, build the session, and hold it for its
    client; returns the adoption token."""
    first = next(requests, None)
    if first is None or not first.HasField("open"):
        raise InvalidRequestError("an Adopt stream starts with the session (AdoptRequest.open)")
    described = first.open
    backend.check_model(described.model_id)
    backend.check_span(described.span.start, described.span.end)
    backend.check_session_shape(described.batch_size, described.max_length)
    start, end, position = described.span.start, described.span.end, first.position
    if position > described.max_length:
        raise InvalidRequestError(f"position {position} exceeds max_length {described.max_length}")
    mask = None
    if first.HasField("attention_mask"):
        mask = deserialize(first.attention_mask, frozenset({"int64"}))
        if list(mask.shape) != [described.batch_size, position]:
            raise InvalidRequestError(f"attention_mask shape {list(mask.shape)} is not [batch, position]")
    layers: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for message in _with_first(first, requests):
        if not message.HasField("keys"):
            continue
        if not start <= message.layer < end or message.layer in layers:
            raise InvalidRequestError(f"layer {message.layer} is outside {start}:{end} or sent twice")
        keys = _layer_tensor(message.keys, backend, described.batch_size, position, "keys")
        values = _layer_tensor(message.values, backend, described.batch_size, position, "values")
        if keys.shape[:3] != values.shape[:3] or message.seen != position:
            raise InvalidRequestError(f"layer {message.layer}: keys, values and positions disagree")
        layers[message.layer] = (keys.to(backend.device), values.to(backend.device), message.seen)
    if position and sorted(layers) != list(range(start, end)):
        raise InvalidRequestError(
            f"a hand-off of {position} positions must carry every layer of {start}:{end}"
        )
    cache = backend.span.new_cache()
    if position:
        backend.span.import_cache(cache, start, end, [layers[block] for block in range(start, end)])
    session = sessions.open(
        start,
        end,
        described.batch_size,
        described.max_length,
        cache,
        described.session_id,
        client=f"adopted:{described.session_id}",  # its own quota until its client claims it
    )
    session.position = position
    session.attention_mask = mask
    return sessions.hold_for_adoption(session, ADOPT_CLAIM_S)


def _with_first(first: pb.AdoptRequest, rest: Iterator[pb.AdoptRequest]) -> Iterator[pb.AdoptRequest]:
    yield first
    yield from rest


def _layer_tensor(
    tensor: pb.Tensor, backend: SpanBackend, batch: int, position: int, name: str
) -> torch.Tensor:
    value = deserialize(tensor, FLOAT_DTYPES)
    check_finite(tensor, name)
    if value.dtype != backend.dtype:
        raise InvalidRequestError(f"{name} are {value.dtype}; this server computes in {backend.dtype}")
    if value.dim() != 4 or value.shape[0] != batch or not 0 < value.shape[2] <= position:
        raise InvalidRequestError(
            f"{name} shape {list(value.shape)} is not [batch, heads, kept <= position, dim]"
        )
    if value.shape[1] * value.shape[3] > 4 * backend.limits.hidden_size:  # bounds what a sender makes us hold
        raise InvalidRequestError(f"{name} shape {list(value.shape)} is too wide for this model")
    return value
