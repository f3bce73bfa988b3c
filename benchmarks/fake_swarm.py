"""A simulated swarm for benchmarks/routing.py: N fake servers of a 40-block model announced on a real
hivemind DHT (records only, no weights, nobody listens on their ports).

The fake servers have random spans (a chain of online servers that covers 0:40, replicas of other
servers' spans, and random unaligned spans), states (mostly online, some joining, draining, offline),
a few of another dtype or protocol, random throughputs, open sessions, free cache and limits, and a
measured round trip each (for the client's ``ServerTrust``, as pings would put it there).

How the records get in: one injector DHT node holds every fake server's RSA key. Its record validator
is ``MultiKeySigner``, an ``RSASignatureValidator`` that signs each record with the private key named
in the record's subkey (``peer id[owner:public key]``), so every record is a real signed record that
the stock validators of the other nodes (signature, then ShardServer schema) check and accept, and
the client's ``lookup`` keeps. One node rather than one light DHT node per fake server: a hivemind node
is a process plus a p2pd daemon (tens of MiB, about a second to start), so 250 of them would measure
the host's memory and scheduler rather than routing. What differs from a real swarm is only where
the records are stored: on the injector and bootstrap nodes instead of spread over 250 nodes, which
the look-up of a 3-node DHT reaches in one round anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from shardnet.client.planner import SessionNeeds
from shardnet.dht import ServerRecord, ServerState, start_dht, visible_maddrs
from shardnet.dht.records import block_key, schema_validator
from shardnet.wire import PROTOCOL_VERSION

logger = logging.getLogger("benchmarks.fake_swarm")
NUM_BLOCKS = 40  # Llama-2-13B
DTYPE = "float16"  # what the client computes in; a few fake servers announce another dtype
NEEDS = SessionNeeds(batch_size=1, max_length=2048)  # the session each route is for


# ---- signing for many fake servers ----


class MultiKeySigner(RSASignatureValidator):
    """An RSASignatureValidator that can sign for several owners: the key named in the record's subkey.

    For the injector node only: it lets one node write the records of many fake servers, each signed
    with that server's own private key, exactly as the server itself would have signed it.
    """

    def __init__(self, private_keys: Sequence[RSAPrivateKey]):
        super().__init__(private_keys[0])
        self._owners = {
            self.PUBLIC_KEY_FORMAT.replace(b"_key_", key.get_public_key().to_bytes()): key
            for key in private_keys
        }

    def sign_value(self, record: DHTRecord) -> bytes:
        found = self._PUBLIC_KEY_RE.findall(record.subkey or b"")
        key = self._owners.get(self.PUBLIC_KEY_FORMAT.replace(b"_key_", found[0])) if found else None
        if key is None:
            return record.value
        signature = key.sign(self._serialize_record(record))
        return record.value + self.SIGNATURE_FORMAT.replace(b"_value_", signature)


def fake_peer_id(key: RSAPrivateKey) -> str:
    """A libp2p-style peer id (base58 sha256 multihash, 'Qm...') derived from the server's public key."""
    digest = hashlib.sha256(key.get_public_key().to_bytes()).digest()
    return PeerID(b"\x12\x20" + digest).to_base58()


def owned_subkey(peer_id: str, key: RSAPrivateKey) -> bytes:
    """What ``shardnet.dht.swarm.owned_subkey`` gives a real server: its peer id, then its public key."""
    public = key.get_public_key().to_bytes()
    return peer_id.encode() + RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", public)


# ---- the simulated swarm ----


def random_spans(count: int, rng: random.Random) -> list[tuple[int, int]]:
    """A chain of spans covering 0:NUM_BLOCKS first, then replicas of earlier spans and unaligned spans."""
    spans: list[tuple[int, int]] = []
    start = 0
    while start < NUM_BLOCKS and len(spans) < count:
        end = min(start + rng.randint(4, 16), NUM_BLOCKS)
        spans.append((start, end))
        start = end
    while len(spans) < count:
        if rng.random() < 0.25:
            spans.append(rng.choice(spans))  # a replica: the same span as another server
        else:
            length = rng.randint(1, 16)
            start = rng.randint(0, NUM_BLOCKS - length)
            spans.append((start, start + length))
    return spans


# Why a server cannot take the benchmark's session, with how often each is drawn for an unusable one.
PROBLEMS = {"joining": 3, "draining": 3, "offline": 2, "dtype": 2, "protocol": 1, "cache": 2, "max_length": 1}


def random_record(peer_id: str, port: int, span: tuple[int, int], problem: str | None, rng: random.Random):
    """A record with varied throughput, load and limits; ``problem``: why the planner must skip it (or None)."""
    blocks = span[1] - span[0]
    block_s = rng.lognormvariate(math.log(0.01), 0.6)  # a GPU's 5-30 ms per 13B block and step
    total = rng.choice([0, 65536, 131072, 262144])  # 0: an older server that did not announce it
    free = max(rng.randint(0, total or 131072), NEEDS.cache_tokens)
    fields = dict(
        state=ServerState.ONLINE.value,
        peer_id=peer_id,
        host="127.0.0.1",
        port=port,  # nobody listens there: the benchmark never dials a fake server
        start=span[0],
        end=span[1],
        dtype=DTYPE,
        protocol=PROTOCOL_VERSION,
        version="0.1.0",
        throughput=0.0 if rng.random() < 0.05 else 1.0 / (block_s * blocks),  # 0: not measured
        cache_tokens_free=free,
        cache_tokens_total=max(total, free) if total else 0,
        open_sessions=min(int(rng.expovariate(0.5)), 30),
        sessions_served=rng.randint(0, 10_000),
        max_length=rng.choice([0, 2048, 4096, 8192]),
        max_batch_size=rng.choice([0, 8, 32]),
    )
    if problem in ("joining", "draining", "offline"):
        fields["state"] = problem
    elif problem == "dtype":
        fields["dtype"] = rng.choice(["bfloat16", "float32"])
    elif problem == "protocol":
        fields["protocol"] = "shardnet.v0"
    elif problem == "cache":
        fields["cache_tokens_free"] = rng.randint(0, NEEDS.cache_tokens - 1)
    elif problem == "max_length":
        fields["max_length"] = NEEDS.max_length // 2
    return ServerRecord(**fields)


@dataclass
class FakeServer:
    key: RSAPrivateKey
    record: ServerRecord
    rtt_s: float  # what the client's pings would have measured


def fake_servers(keys: Sequence[RSAPrivateKey], unusable: float, rng: random.Random) -> list[FakeServer]:
    """The chain covering every block is usable; of the others, a share ``unusable`` has a PROBLEM."""
    spans = random_spans(len(keys), rng)
    chain = next(i for i, span in enumerate(spans) if span[1] == NUM_BLOCKS) + 1  # the covering chain
    servers = []
    for index, (key, span) in enumerate(zip(keys, spans, strict=True)):
        problem = None
        if index >= chain and rng.random() < unusable:
            problem = rng.choices(list(PROBLEMS), weights=list(PROBLEMS.values()))[0]
        record = random_record(fake_peer_id(key), 40000 + index, span, problem, rng)
        servers.append(FakeServer(key, record, rtt_s=rng.uniform(0.001, 0.08)))
    return servers


async def _store_records(keys, subkeys, values, expiration: float, _dht, node) -> dict:
    return await node.store_many(keys, values, expiration, subkeys=subkeys)


def inject(injector: hivemind.DHT, model_id: str, servers: Sequence[FakeServer], ttl_s: float) -> int:
    """Store every fake server's record under each block key of its span; returns the records stored.

    One ``store_many`` per server, as its own announce would do: hivemind hands each call to the node's
    process through a pipe that fails on messages much over its 64 KiB buffer (BlockingIOError in the
    node, then a caller waiting forever), so one call for all records breaks from ~60 servers on.
    """
    stored = wanted = 0
    for server in servers:
        record = server.record
        keys = [block_key(model_id, block) for block in range(record.start, record.end)]
        subkeys = [owned_subkey(record.peer_id, server.key)] * len(keys)
        values = [record.dict()] * len(keys)
        call = partial(_store_records, keys, subkeys, values, get_dht_time() + ttl_s)
        result = injector.run_coroutine(call, return_future=True).result(timeout=60)
        stored += sum(bool(ok) for ok in result.values())
        wanted += len(keys)
    if stored != wanted:
        raise RuntimeError(f"only {stored} of {wanted} records were stored")
    return stored


# ---- the swarm's DHT ----


@contextlib.contextmanager
def simulated_swarm(servers: Sequence[FakeServer], model_id: str, ttl_s: float) -> Iterator[hivemind.DHT]:
    """A bootstrap node, an injector that announces every fake server, and a client-mode node (yielded)."""
    nodes: list[hivemind.DHT] = []
    try:
        nodes.append(start_dht(host="127.0.0.1"))
        peers = visible_maddrs(nodes[0])
        injector = hivemind.DHT(
            initial_peers=peers,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            record_validators=[
                MultiKeySigner([server.key for server in servers]),
                schema_validator(model_id, NUM_BLOCKS),
            ],
            start=False,
        )
        nodes.append(injector)
        injector.run_in_background(await_ready=True, timeout=120)
        # The client's node exactly as SwarmView.connect starts it: its validators check every record read.
        client = start_dht(peers, client_mode=True, model_id=model_id, num_blocks=NUM_BLOCKS)
        nodes.append(client)
        began = time.perf_counter()
        stored = inject(injector, model_id, servers, ttl_s)
        logger.info("N=%d: %d records stored in %.1fs", len(servers), stored, time.perf_counter() - began)
        yield client
    finally:
        for node in reversed(nodes):
            node.shutdown()
