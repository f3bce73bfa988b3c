"""gRPC channels, one per server address, reused for the client's lifetime."""

from __future__ import annotations

import threading

import grpc

from shardnet.wire import pb_grpc
from shardnet.wire.call_auth import CallSigner
from shardnet.wire.channels import server_channel


class Transport:
    def __init__(self, max_message_bytes: int, signer: CallSigner | None = None):
        """``signer``: a private swarm's, which signs every call (``wire/call_auth.py``)."""
        self.max_message_bytes = max_message_bytes
        self.signer = signer
        self._channels: dict[tuple[str, str], grpc.Channel] = {}
        self._stubs: dict[tuple[str, str], pb_grpc.ShardStub] = {}
        self._lock = threading.Lock()

    def stub(self, address: str, fingerprint: str = "") -> pb_grpc.ShardStub:
        """A stub for the server at ``address``, over TLS pinned to ``fingerprint`` if it announced one
        (ServerIdentityError if it presents another certificate)."""
        key = (address, fingerprint)
        with self._lock:
            stub = self._stubs.get(key)
        if stub is None:  # a TLS channel first reads the server's certificate: not under the lock
            options = [
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
            ]
            channel = server_channel(address, options, fingerprint, self.signer)
            with self._lock:
                if key in self._stubs:  # another thread got there first
                    channel.close()
                    return self._stubs[key]
                self._channels[key] = channel
                stub = self._stubs[key] = pb_grpc.ShardStub(channel)
        return stub

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()
