"""gRPC channels, one per server address, reused for the client's lifetime."""

from __future__ import annotations

import threading

import grpc

from shardnet.wire import pb_grpc
from shardnet.wire.call_auth import CallSigner, signed_channel


class Transport:
    def __init__(self, max_message_bytes: int, signer: CallSigner | None = None):
        """``signer``: a private swarm's, which signs every call (``wire/call_auth.py``)."""
        self.max_message_bytes = max_message_bytes
        self.signer = signer
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, pb_grpc.ShardStub] = {}
        self._lock = threading.Lock()

    def stub(self, address: str) -> pb_grpc.ShardStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = grpc.insecure_channel(
                    address,
                    options=[
                        ("grpc.max_send_message_length", self.max_message_bytes),
                        ("grpc.max_receive_message_length", self.max_message_bytes),
                    ],
                )
                channel = signed_channel(channel, self.signer, address)
                self._channels[address] = channel
                stub = self._stubs[address] = pb_grpc.ShardStub(channel)
            return stub

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()
