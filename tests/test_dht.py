"""DHT records: signed per server, schema-checked."""

from __future__ import annotations

import pytest
from hivemind.utils import get_dht_time

from shardnet.dht import ServerRecord, block_key, lookup, start_dht
from shardnet.dht.swarm import owned_subkey


@pytest.fixture(scope="module")
def dht_pair():
    boot = start_dht()
    peers = [str(m) for m in boot.get_visible_maddrs()]
    node = start_dht(peers, model_id="llama_test", num_blocks=4)
    yield boot, node, peers
    node.shutdown()
    boot.shutdown()


def _record(node=None, **changes) -> ServerRecord:
    fields = dict(
        state="online",
        peer_id=node.peer_id.to_base58() if node else "x",
        host="127.0.0.1",
        port=5000,
        start=0,
        end=2,
        dtype="float32",
        protocol="shardnet.v1",
        version="0.1.0",
        throughput=1.0,
        cache_tokens_free=10,
    )
    fields.update(changes)
    return ServerRecord(**fields)


def test_unsigned_and_malformed_records_are_refused(dht_pair):
    from shardnet.dht import announce

    _, node, peers = dht_pair
    assert announce(node, "llama_test", _record(node), ttl_s=30)
    intruder = start_dht(peers, client_mode=True, model_id="llama_test", num_blocks=4)
    try:
        expiration = get_dht_time() + 30
        # Nodes that do not know the model (the bootstrap) may keep these; readers must never return them.
        forged = _record(node, port=6666).dict()  # a well-formed record claiming to be the real server
        intruder.store(block_key("llama_test", 0), {"state": "online"}, expiration, subkey=b"malformed")
        intruder.store(block_key("llama_test", 0), forged, expiration, subkey=b"no-owner-key")
        intruder.store(block_key("llama_test", 1), forged, expiration, subkey=owned_subkey(node))  # unsigned
        views = lookup(intruder, "llama_test", 4)
        assert [len(v) for v in views] == [1, 1, 0, 0]
        assert views[0][0].record.port == 5000
    finally:
        intruder.shutdown()


def test_record_schema_rejects_bad_spans():
    with pytest.raises(ValueError):
        _record(start=3, end=3)
