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

The fake servers (random spans, states, dtypes, protocols, throughputs, load and limits, and a round trip
each, put into the client's ``ServerTrust`` as pings would) and how their records get in: `fake_swarm.py`.

One JSON line per N: look-up and route times p50/p95/max in ms, servers seen and usable, hops per
route, and whether the target (route computation p95 under --target-ms, 10 ms) is met.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import harness
from fake_swarm import DTYPE, NEEDS, NUM_BLOCKS, fake_servers, simulated_swarm
from hivemind.utils.crypto import RSAPrivateKey

from shardnet.client.config import ClientConfig
from shardnet.client.planner import RoutePlanner
from shardnet.client.routing import CostModel, HopCost, RouteHop, cheapest_route, hop_costs
from shardnet.client.swarm_view import SwarmView, distinct_servers
from shardnet.client.trust import ServerTrust
from shardnet.dht import ServerState, ServerView, lookup
from shardnet.wire import PROTOCOL_VERSION

logger = logging.getLogger("benchmarks.routing")


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
