"""DHT records: signed per server, schema-checked."""

from __future__ import annotations

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from shardnet.dht import ServerRecord, block_key, lookup, start_dht
from shardnet.dht.records import schema_validator
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


def _stranger(peers: list[str]) -> hivemind.DHT:
    """Another peer, with an RSA key of its own: every DHT that start_dht starts in one process shares
    that process's key, so one of those could sign records as the real server."""
    return hivemind.DHT(
        initial_peers=peers,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        client_mode=True,
        record_validators=[RSASignatureValidator(RSAPrivateKey()), schema_validator("llama_test", 4)],
        start=True,
    )


def test_unsigned_and_malformed_records_are_refused(dht_pair):
    from shardnet.dht import announce

    _, node, peers = dht_pair
    assert announce(node, "llama_test", _record(node), ttl_s=30)
    intruder = _stranger(peers)
    try:
        expiration = get_dht_time() + 30
        # Nodes that do not know the model (the bootstrap) may keep these; readers must never return them.
        forged = _record(node, port=6666).dict()  # a well-formed record claiming to be the real server
        intruder.store(block_key("llama_test", 0), {"state": "online"}, expiration, subkey=b"malformed")
        intruder.store(block_key("llama_test", 0), forged, expiration, subkey=b"no-owner-key")
        intruder.store(block_key("llama_test", 1), forged, expiration, subkey=owned_subkey(node))  # unsigned
        views = lookup(intruder, "llama_test", 4)
        assert [len(v) for v in views] == [1, 1, 0, 0]
        assert views[0][0].record.port == views[1][0].record.port == 5000
    finally:
        intruder.shutdown()


def test_a_peer_cannot_overwrite_or_retract_another_servers_record(dht_pair):
    """Under the real server's own subkey, with later expirations: a changed address, and an OFFLINE
    record standing in for a deletion (hivemind has none). Neither is signed by the owner's key."""
    from shardnet.dht import announce

    _, node, peers = dht_pair
    assert announce(node, "llama_test", _record(node, start=2, end=4), ttl_s=30)
    intruder = _stranger(peers)
    try:
        later = get_dht_time() + 300
        for changes in ({"port": 6666}, {"state": "offline"}):
            hijacked = _record(node, start=2, end=4, **changes).dict()
            intruder.store(block_key("llama_test", 2), hijacked, later, subkey=owned_subkey(node))
        for reader in (intruder, node):
            [view] = lookup(reader, "llama_test", 4)[2]
            assert (view.record.port, view.record.state) == (5000, "online")
            assert view.expiration_time < later
    finally:
        intruder.shutdown()


def test_record_schema_rejects_bad_spans():
    with pytest.raises(ValueError):
        _record(start=3, end=3)
