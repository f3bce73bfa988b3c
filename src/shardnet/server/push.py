"""PushSender: pass a step's output straight to the next server of the session's route.

A decode step then costs N+1 one-way network delays instead of 2N. A server pushes only to addresses
announced in the DHT for its own model (never to an arbitrary address a request names), over
channels it keeps open. A push is answered once the next server has queued the step, so the sender
learns within a round trip (``wire/push_ack.py``) whether the next hop took it, and tells the client in
its answer (``StepResult.push_error``): the client, which listens to every server of the route, then
delivers the step to the next hop itself. A link broken between two servers, or a next server frozen,
costs a step about a second, not a timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from shardnet.errors import InvalidRequestError, ShardnetError
from shardnet.wire import pb, pb_grpc
from shardnet.wire.call_auth import CallSigner
from shardnet.wire.channels import server_channel
from shardnet.wire.clock_offset import ClockOffset
from shardnet.wire.push_ack import push_ack_timeout_s

logger = logging.getLogger(__name__)
LOOKUP_INTERVAL_S = 0.5  # an address not yet seen is looked up again at most this often (all sessions)
# How long a push waits for an address to appear before refusing it: a server that joined a moment ago (a
# replacement the client already found) may not be in this server's DHT node's copy of the records yet.
# Seen on the 2-core CI machine: a replacement ready 0.5 s after its start was refused by the server before
# it, and the client waited its request timeout. Its next announcements (ONLINE, then its first session's
# load) reach this node within a second or two.
NEW_ADDRESS_WAIT_S = 3.0


@dataclass(frozen=True)
class PushOutcome:
    """What became of one push: "" or why it failed, when it left, and its round trip."""

    error: str  # "" when the next server took the step
    sent: float  # time.perf_counter() when the push request left (after the address was checked)
    round_trip_s: float  # sent to acknowledged (or to the failure)
    one_way_s: float = 0.0  # sent to its arrival there, through the clocks' estimated offset (0: unknown)


class PushSender:
    def __init__(
        self,
        announced_addresses: Callable[[], dict[str, str]],
        channel_options: list[tuple[str, int]],
        signer: CallSigner | None = None,
    ):
        # host:port -> TLS fingerprint ("" = none) of this model's servers in the DHT (a look-up)
        self._announced = announced_addresses
        self._options = channel_options
        self._signer = signer  # a private swarm's: pushes carry credentials like clients' calls
        self._allowed: dict[str, str] = {}
        self._checked_at = float("-inf")
        self._stubs: dict[tuple[str, str], pb_grpc.ShardStub] = {}
        self._channels: list[grpc.Channel] = []
        self._clocks: dict[str, ClockOffset] = {}  # address -> that server's clock against this one's
        self._lock = threading.Lock()

    def announced_fingerprint(self, address: str) -> str:
        """The TLS fingerprint the server at ``address`` announced ("" = none); refuse an address no server
        of this model announced. A miss is looked up again (at most every ``LOOKUP_INTERVAL_S`` for all
        sessions together) for up to ``NEW_ADDRESS_WAIT_S``, so a server that just joined, e.g. a
        replacement, is pushed to as soon as this server's DHT node sees its record. Only the session
        that named the address waits (pushes run on its stream's thread, not the compute thread)."""
        deadline = time.monotonic() + NEW_ADDRESS_WAIT_S
        while True:
            with self._lock:
                if address in self._allowed:
                    return self._allowed[address]
                wait = self._checked_at + LOOKUP_INTERVAL_S - time.monotonic()
            if wait <= 0:
                allowed = self._announced()
                with self._lock:
                    self._allowed, self._checked_at = allowed, time.monotonic()
                if address in allowed:
                    return allowed[address]
                wait = LOOKUP_INTERVAL_S
            if time.monotonic() + wait > deadline:
                raise InvalidRequestError(
                    f"push to {address}: no server of this model announced that address"
                )
            time.sleep(wait)

    def _stub(self, address: str, fingerprint: str) -> pb_grpc.ShardStub:
        with self._lock:
            stub = self._stubs.get((address, fingerprint))
        if stub is None:  # a TLS channel first reads the server's certificate: not under the lock
            channel = server_channel(address, self._options, fingerprint, self._signer)
            with self._lock:
                self._channels.append(channel)
                stub = self._stubs.setdefault((address, fingerprint), pb_grpc.ShardStub(channel))
        return stub

    def push(self, step: pb.Step, output: pb.Tensor) -> PushOutcome:
        """Send ``output`` as the next hop's step and wait for it to be queued there; the outcome's error is
        "" or why it was not (an address no server of this model announced, a refusal, a link that does not
        answer)."""
        hop = step.push[0]
        pushed = pb.Step(step_id=hop.step_id, position=hop.position, hidden_states=output, push=step.push[1:])
        for name in ("attention_mask", "position_ids"):
            if step.HasField(name):
                getattr(pushed, name).CopyFrom(getattr(step, name))
        if hop.HasField("hypo_ids"):
            pushed.hypo_ids.CopyFrom(hop.hypo_ids)
        request = pb.PushRequest(push_token=hop.push_token, step=pushed)
        sent = time.perf_counter()
        try:
            stub = self._stub(hop.address, self.announced_fingerprint(hop.address))
            sent = time.perf_counter()
            ack = stub.Push(request, timeout=push_ack_timeout_s(request.ByteSize()))
        except ShardnetError as exc:  # not announced, or (TLS) not the certificate it announced
            return PushOutcome(str(exc), sent, time.perf_counter() - sent)
        except grpc.RpcError as exc:
            error = f"push to {hop.address} failed: {exc.code().name}"
            logger.info("%s", error)
            return PushOutcome(error, sent, time.perf_counter() - sent)
        acked = time.perf_counter()
        with self._lock:
            clock = self._clocks.setdefault(hop.address, ClockOffset())
            clock.add(sent, ack.arrived_at_s, ack.arrived_at_s, acked)  # acknowledged as it arrived
            one_way_s = clock.one_way_to(sent, ack.arrived_at_s)
        return PushOutcome("", sent, acked - sent, one_way_s or 0.0)

    def close(self) -> None:
        with self._lock:
            channels, self._channels, self._stubs = self._channels, [], {}
        for channel in channels:
            channel.close()
