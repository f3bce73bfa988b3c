"""Generated gRPC stubs for shardnet.v1 (python -m shardnet.wire.regen)."""
