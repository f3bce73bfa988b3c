"""Typed, signed, schema-checked server records on a hivemind DHT."""

from shardnet.dht.records import ServerRecord, ServerState, ServerView, block_key
from shardnet.dht.swarm import announce, lookup, start_dht, visible_maddrs

__all__ = [
    "ServerRecord",
    "ServerState",
    "ServerView",
    "announce",
    "block_key",
    "lookup",
    "start_dht",
    "visible_maddrs",
]
