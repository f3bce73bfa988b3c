"""Routing on a simulated swarm: DHT look-up time and route computation time with 50-250 servers.

    python benchmarks/routing.py --servers 50 120 250 --plot routing.png

For each --servers N: a real hivemind DHT on 127.0.0.1 (a bootstrap node, an injector node, and a
client-mode node started exactly as a client starts its own), N fake servers of a 40-block model
announced on it (records only, no weights, nobody listens on their ports), then:

- look-up: ``lookup()`` of all 40 block keys from the client node, --lookups times (what each
  background refresh of a client's ``SwarmView`` pays, every 5 s by default);
- route: ``RoutePlanner.try_route(0, 40)`` over a ``SwarmView`` snapshot of that swarm, --routes times
  (what a client pays per route: filtering the snapshot, ``hop_costs``, ``cheapest_route``), and the two
  pure functions timed apart on the usable servers. Every route is checked: contiguous, covering 0:40,
  each hop inside its server's span and on a usable server; a sample is also checked to cost exactly
  what a brute-force shortest path over the same costs finds.

The fake servers have random spans (a chain of online servers that covers 0:40, replicas of other
servers' spans, and random unaligned spans), states (mostly online, some joining, draining, offline),
a few of another dtype or protocol, random throughputs, open sessions, free cache and limits, and a
measured round trip each (put into the client's ``ServerTrust`` as pings would).

How the records get in: one injector DHT node holds every fake server's RSA key. Its record validator
is ``MultiKeySigner``, an ``RSASignatureValidator`` that signs each record with the private key named
in the record's subkey (``peer id[owner:public key]``), so every record is a real signed record that
the stock validators of the other nodes (signature, then ShardServer schema) check and accept, and
the client's ``lookup`` keeps. One node rather than one light DHT node per fake server: a hivemind node
is a process plus a p2pd daemon (tens of MiB, about a second to start), so 250 of them would measure
the host's memory and scheduler rather than routing. What differs from a real swarm is only where
the records are stored: on the injector and bootstrap nodes instead of spread over 250 nodes, which
the look-up of a 3-node DHT reaches in one round anyway.

One JSON line per N: look-up and route times p50/p95/max in ms, servers seen and usable, hops per
route, and whether the target (route computation p95 under --target-ms, 10 ms) is met.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import harness
import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from shardnet.client.config import ClientConfig
from shardnet.client.planner import RoutePlanner, SessionNeeds
from shardnet.client.routing import CostModel, HopCost, RouteHop, cheapest_route, hop_costs
from shardnet.client.swarm_view import SwarmView, distinct_servers
from shardnet.client.trust import ServerTrust
from shardnet.dht import ServerRecord, ServerState, ServerView, lookup, start_dht, visible_maddrs
from shardnet.dht.records import block_key, schema_validator
from shardnet.wire import PROTOCOL_VERSION

logger = logging.getLogger("benchmarks.routing")
NUM_BLOCKS = 40  # Llama-2-13B
DTYPE = "float16"  # what the client computes in; a few fake servers announce another dtype
NEEDS = SessionNeeds(batch_size=1, max_length=2048)  # the session each route is for


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_run_args(parser)
    parser.add_argument(
        "--servers", type=int, nargs="+", default=[120], help="fake servers announced (a sweep: 50 120 250)"
    )
    parser.add_argument("--lookups", type=int, default=30, help="timed DHT look-ups of all 40 blocks per N")
    parser.add_argument("--routes", type=int, default=500, help="timed route computations per N")
    parser.add_argument("--optimal-checks", type=int, default=20, help="routes also checked by brute force")
    parser.add_argument(
        "--unusable",
        type=float,
        default=0.25,
        help="share of servers the planner must skip (state, dtype...)",
    )
    parser.add_argument("--target-ms", type=float, default=10.0, help="route computation target (p95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated swarm")
    return parser.parse_args()


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


# ---- checks ----


def usable_server(view: ServerView) -> bool:
    """The planner's filter, restated: what a valid route may use (nothing is banned in this benchmark)."""
    record = view.record
    return (
        record.state == ServerState.ONLINE.value
        and record.dtype == DTYPE
        and record.protocol == PROTOCOL_VERSION
        and (not record.max_length or record.max_length >= NEEDS.max_length)
        and (not record.max_batch_size or record.max_batch_size >= NEEDS.batch_size)
        and record.cache_tokens_free >= NEEDS.cache_tokens
    )


def route_valid(route: Sequence[RouteHop] | None) -> bool:
    if not route or route[0].start != 0 or route[-1].end != NUM_BLOCKS:
        return False
    for hop, after in zip(route, [*route[1:], None], strict=True):
        record = hop.server.record
        if not (record.start <= hop.start < hop.end <= record.end) or not usable_server(hop.server):
            return False
        if after is not None and after.start != hop.end:
            return False
    return True


def route_cost(route: Sequence[RouteHop], servers: Sequence[ServerView], costs: Sequence[HopCost]) -> float:
    index = {id(view): i for i, view in enumerate(servers)}
    total = 0.0
    for hop in route:
        cost = costs[index[id(hop.server)]]
        total += cost.fixed_s + (hop.end - hop.start) * cost.per_block_s
    return total


def brute_force_cost(servers: Sequence[ServerView], costs: Sequence[HopCost]) -> float:
    """The cheapest chain cost by trying every (entry, exit) of every server: O(blocks^2 * servers)."""
    best = [math.inf] * (NUM_BLOCKS + 1)
    best[0] = 0.0
    for b in range(1, NUM_BLOCKS + 1):
        for view, cost in zip(servers, costs, strict=True):
            record = view.record
            if record.start < b <= record.end:
                for a in range(record.start, b):
                    best[b] = min(best[b], best[a] + cost.fixed_s + (b - a) * cost.per_block_s)
    return best[NUM_BLOCKS]


# ---- measuring ----


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], list]:
    """Seconds per call and the results, over ``repeats`` calls."""
    times, results = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
        results.append(result)
    return times, results


def spread_ms(name: str, seconds: Sequence[float]) -> dict:
    return {
        f"{name}_ms_p50": harness.ms(harness.percentile(seconds, 50)),
        f"{name}_ms_p95": harness.ms(harness.percentile(seconds, 95)),
        f"{name}_ms_max": harness.ms(max(seconds)),
    }


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


def bench_swarm(count: int, keys: Sequence[RSAPrivateKey], args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed * 1000 + count)
    servers = fake_servers(keys[:count], args.unusable, rng)
    model_id = f"bench{NUM_BLOCKS}_n{count}"
    ttl_s = args.time_limit_s + 60  # records outlive the run; nothing re-announces them
    began = time.perf_counter()
    with simulated_swarm(servers, model_id, ttl_s) as client:
        setup_s = time.perf_counter() - began
        lookup(client, model_id, NUM_BLOCKS)  # warm-up: connections, routing tables
        lookup_s, found = timed(lambda: lookup(client, model_id, NUM_BLOCKS), args.lookups)
        per_block = found[-1]
        seen = distinct_servers(per_block)

        health = ServerTrust()  # this benchmark's own, with the RTTs pings would have measured
        for server in servers:
            health.record_rtt(server.record.peer_id, server.rtt_s)
        view = SwarmView(client, model_id, NUM_BLOCKS, owns_dht=False, health=health)
        view.refresh()  # the snapshot every route reads; no background refresh (it would compete for the GIL)
        planner = RoutePlanner(view, health, ClientConfig(dtype=harness.torch_dtype(DTYPE)))
        planner.try_route(0, NUM_BLOCKS, NEEDS)  # warm-up
        route_s, routes = timed(lambda: planner.try_route(0, NUM_BLOCKS, NEEDS), args.routes)

        usable = [v for v in view.snapshot().servers if usable_server(v)]
        rtts, sessions, cost_model = health.rtts(), health.open_sessions(), CostModel()
        costs_s, all_costs = timed(lambda: hop_costs(usable, rtts, sessions, cost_model, rng), args.routes)
        search_s, _ = timed(lambda: cheapest_route(usable, all_costs[0], 0, NUM_BLOCKS), args.routes)
        optimal_ok = 0
        for costs in all_costs[: args.optimal_checks]:
            route = cheapest_route(usable, costs, 0, NUM_BLOCKS)
            optimal_ok += math.isclose(route_cost(route, usable, costs), brute_force_cost(usable, costs))

    hops = [len(route) for route in routes if route]
    route_p95_ms = harness.ms(harness.percentile(route_s, 95))
    return harness.record(
        "routing",
        model=f"simulated:{NUM_BLOCKS} blocks",
        model_id=model_id,
        dtype=DTYPE,
        servers=count,
        servers_seen=len(seen),
        servers_usable=len(usable),
        records_seen=sum(len(views) for views in per_block),
        servers_per_block_min=min(len(views) for views in per_block),
        span_len_p50=harness.median([s.record.end - s.record.start for s in servers]),
        setup_s=round(setup_s, 3),
        lookups=args.lookups,
        **spread_ms("lookup", lookup_s),
        routes=args.routes,
        **spread_ms("route", route_s),
        costs_ms_p50=harness.ms(harness.percentile(costs_s, 50)),
        search_ms_p50=harness.ms(harness.percentile(search_s, 50)),
        hops_p50=harness.median(hops) if hops else None,
        hops_min=min(hops, default=None),
        hops_max=max(hops, default=None),
        distinct_routes=len({tuple((h.peer_id, h.start, h.end) for h in r) for r in routes if r}),
        routes_valid=sum(route_valid(route) for route in routes),
        optimal_checked=min(args.optimal_checks, len(all_costs)),
        optimal_ok=optimal_ok,
        target_ms=args.target_ms,
        target_met=route_p95_ms < args.target_ms,
    )


def plot(results: list[dict], path: Path) -> None:
    fig, (route, look) = harness.new_figure(2)
    counts = [r["servers"] for r in results]
    for axis, name, title in (
        (route, "route", "route computation"),
        (look, "lookup", "DHT look-up, 40 blocks"),
    ):
        for q in ("p50", "p95", "max"):
            axis.plot(counts, [r[f"{name}_ms_{q}"] for r in results], "o-", label=q)
        axis.set_xticks(counts)
        axis.set_xlabel("servers announced")
        axis.set_ylabel("ms")
        axis.set_title(title, fontsize=9)
        axis.set_ylim(bottom=0)
    target = results[0]["target_ms"]
    route.axhline(target, color="grey", linestyle="--", label="target")
    route.set_ylim(0, max(target, *(r["route_ms_max"] for r in results)) * 1.15)
    route.legend()
    look.legend()
    harness.save_figure(fig, path, f"routing over {NUM_BLOCKS} blocks, simulated servers (records only)")


def main() -> None:
    args = parse_args()
    harness.setup(args)
    results = []
    with harness.time_limit(args.time_limit_s):
        began = time.perf_counter()
        keys = [RSAPrivateKey() for _ in range(max(args.servers))]
        logger.info("%d RSA keys made in %.1fs", len(keys), time.perf_counter() - began)
        for count in args.servers:
            result = bench_swarm(count, keys, args)
            harness.emit(result)
            results.append(result)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
