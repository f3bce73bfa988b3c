"""The wire: tensors <-> protobuf, typed errors <-> gRPC status codes, and the generated stubs."""

from shardnet.wire.v1 import shardnet_pb2 as pb
from shardnet.wire.v1 import shardnet_pb2_grpc as pb_grpc

PROTOCOL_VERSION = "shardnet.v1"

__all__ = ["pb", "pb_grpc", "PROTOCOL_VERSION"]
