"""PushSender: pass a step's output straight to the next server of the session's route.

A decode step then costs N+1 one-way network delays instead of 2N. A server pushes only to addresses
announced in the DHT for its own model (never to an arbitrary address a request names), over
channels it keeps open. A push is answered once the next server has queued the step, so the sender
learns at once whether the next hop took it; if not, it tells the client (``StepResult.push_error``),
which goes on from that hop itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from shardnet.errors import InvalidRequestError
from shardnet.wire import pb, pb_grpc

logger = logging.getLogger(__name__)
ALLOWED_MAX_AGE_S = 5.0  # an address not yet seen is looked up again at most this often


class PushSender:
    def __init__(
        self,
        announced_addresses: Callable[[], set[str]],
        channel_options: list[tuple[str, int]],
        timeout_s: float = 10.0,
    ):
        self._announced = announced_addresses  # host:port of this model's servers in the DHT (a look-up)
        self._options = channel_options
        self.timeout_s = timeout_s
        self._allowed: set[str] = set()
        self._checked_at = float("-inf")
        self._stubs: dict[str, pb_grpc.ShardStub] = {}
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    def check_allowed(self, address: str) -> None:
        """Refuse an address no server of this model announced (looked up again when stale)."""
        with self._lock:
            if address in self._allowed:
                return
            if time.monotonic() - self._checked_at < ALLOWED_MAX_AGE_S:
                fresh = None
            else:
                fresh = True
        if fresh:
            allowed = self._announced()
            with self._lock:
                self._allowed, self._checked_at = allowed, time.monotonic()
            if address in allowed:
                return
        raise InvalidRequestError(f"push to {address}: no server of this model announced that address")

    def _stub(self, address: str) -> pb_grpc.ShardStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = grpc.insecure_channel(address, options=self._options)
                self._channels.append(channel)
                stub = self._stubs[address] = pb_grpc.ShardStub(channel)
            return stub

    def push(self, step: pb.Step, output: pb.Tensor) -> str:
        """Send ``output`` as the next hop's step; returns "" when it took it, else why not."""
        hop, rest = step.push[0], step.push[1:]
        pushed = pb.Step(
            step_id=hop.step_id,
            position=hop.position,
            hidden_states=output,
            push=rest,
        )
        for name in ("attention_mask", "position_ids"):
            if step.HasField(name):
                getattr(pushed, name).CopyFrom(getattr(step, name))
        if hop.HasField("hypo_ids"):
            pushed.hypo_ids.CopyFrom(hop.hypo_ids)
        try:
            self.check_allowed(hop.address)
            self._stub(hop.address).Push(
                pb.PushRequest(push_token=hop.push_token, step=pushed), timeout=self.timeout_s
            )
        except InvalidRequestError as exc:
            return str(exc)
        except grpc.RpcError as exc:
            logger.info("push to %s failed: %s", hop.address, exc.code().name)
            return f"push to {hop.address} failed: {exc.code().name} {exc.details() or ''}".strip()
        return ""

    def close(self) -> None:
        with self._lock:
            channels, self._channels, self._stubs = self._channels, [], {}
        for channel in channels:
            channel.close()
