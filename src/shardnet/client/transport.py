"""gRPC channels, one per server address, reused for the client's lifetime."""

from __future__ import annotations

import threading

import grpc

from shardnet.wire import pb_grpc


class Transport:
    def __init__(self, max_message_bytes: int):
        self.max_message_bytes = max_message_bytes
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
                self._channels[address] = channel
                stub = self._stubs[address] = pb_grpc.ShardStub(channel)
            return stub

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()
