"""Choosing the chain of servers with the least expected time per token. Pure functions, no I/O.

Running blocks ``a:b`` on server ``s`` costs one hop, ``fixed_s`` (its round-trip time plus a per-request
overhead), and ``per_block_s`` for each block (its announced compute time per block). A server does one
step at a time, so everything it does for a step (the overhead and the compute, not the network) is
scaled up by its load: a step waits behind the steps of its other sessions. A route may use any part of a server's span, so the cheapest chain over blocks ``start:end`` is a
shortest path over block boundaries; since a hop's cost is linear in its length, one sweep over the
boundaries finds it in O(sum of the servers' span lengths).

Concurrent clients that see the same swarm must not all pick the same "best" replica: every route
draws a random factor per server (``jitter``), so near-best chains are picked at random, and a server
that is busier (more open sessions, less free cache) is picked less often.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardnet.dht import ServerView


@dataclass(frozen=True)
class RouteHop:
    server: ServerView
    start: int  # first block this hop runs (inclusive)
    end: int  # one past the last block this hop runs

    @property
    def peer_id(self) -> str:
        return self.server.record.peer_id

    def __str__(self) -> str:
        return f"{self.start}:{self.end}@{self.server.short_id}"


def describe(route: Sequence[RouteHop]) -> str:
    """'0:3@..x7Qk -> 3:6@..ab12', for logs."""
    return " -> ".join(str(hop) for hop in route)


@dataclass(frozen=True)
class CostModel:
    """The constants of the expected-time model (seconds)."""

    hop_overhead_s: float = 0.001  # per hop and step besides the network: encode, decode, gRPC threads
    default_rtt_s: float = 0.005  # round trip assumed for a server not measured yet
    default_block_s: float = 0.005  # compute per block assumed for a server that announced no throughput
    jitter: float = 0.15  # each server's cost is scaled by a random factor in [1 - jitter, 1 + jitter]


@dataclass(frozen=True)
class HopCost:
    fixed_s: float  # paid once when the route enters this server
    per_block_s: float  # paid for every block the route runs on it


def hop_costs(
    servers: Sequence[ServerView],
    rtts: Mapping[str, float],
    local_sessions: Mapping[str, int],
    model: CostModel = CostModel(),
    rng: random.Random | None = None,
) -> list[HopCost]:
    """Each server's expected cost: measured RTT, announced throughput, load, and a random factor."""
    rng = rng or random
    block_times = [
        1.0 / (view.record.throughput * (view.record.end - view.record.start))
        for view in servers
        if view.record.throughput > 0
    ]
    typical_block_s = statistics.median(block_times) if block_times else model.default_block_s
    costs = []
    for view in servers:
        record = view.record
        if record.throughput > 0:
            block_s = 1.0 / (record.throughput * (record.end - record.start))
        else:
            block_s = typical_block_s
        # Without batching, a step waits behind the other sessions' steps: its server-side time grows
        # with the sessions (the larger of the announced count and this process's own, never stale).
        sessions = max(record.open_sessions, local_sessions.get(record.peer_id, 0))
        load = 1.0 + sessions
        if record.cache_tokens_total > 0:
            load *= 2.0 - min(record.cache_tokens_free / record.cache_tokens_total, 1.0)
        factor = 1.0 + rng.uniform(-model.jitter, model.jitter)
        rtt_s = rtts.get(record.peer_id, model.default_rtt_s)
        fixed_s = rtt_s + model.hop_overhead_s * load
        costs.append(HopCost(fixed_s * factor, block_s * load * factor))
    return costs


def cheapest_route(
    servers: Sequence[ServerView], costs: Sequence[HopCost], start: int, end: int
) -> list[RouteHop] | None:
    """The cheapest chain of hops covering blocks ``start:end``, or None if some block has no server.

    best[b] is the cheapest cost of reaching boundary b. For server i covering block b-1, entering it at
    boundary a (its start <= a < b) costs best[a] + fixed_i + (b - a) * per_block_i, so it is enough to
    carry, per server, the minimum of best[a] - a * per_block_i over the boundaries seen inside its span.
    """
    covering: list[list[int]] = [[] for _ in range(end - start)]
    for index, view in enumerate(servers):
        for block in range(max(view.record.start, start), min(view.record.end, end)):
            covering[block - start].append(index)
    best = [math.inf] * (end - start + 1)  # indexed by boundary - start
    best[0] = 0.0
    back: list[tuple[int, int]] = [(-1, -1)] * (end - start + 1)  # (server, entry boundary) per boundary
    entry_value = [math.inf] * len(servers)
    entry_at = [-1] * len(servers)
    for b in range(1, end - start + 1):
        if not covering[b - 1]:
            return None
        left = best[b - 1]
        for index in covering[b - 1]:
            per_block = costs[index].per_block_s
            value = left - (b - 1) * per_block
            if value < entry_value[index]:
                entry_value[index], entry_at[index] = value, b - 1
            candidate = entry_value[index] + costs[index].fixed_s + b * per_block
            if candidate < best[b]:
                best[b], back[b] = candidate, (index, entry_at[index])
    route: list[RouteHop] = []
    b = end - start
    while b > 0:
        index, a = back[b]
        route.append(RouteHop(servers[index], start + a, start + b))
        b = a
    route.reverse()
    return route


def missing_blocks(servers: Sequence[ServerView], start: int, end: int) -> list[int]:
    """Blocks of ``start:end`` that none of ``servers`` holds."""
    held = set()
    for view in servers:
        held.update(range(max(view.record.start, start), min(view.record.end, end)))
    return [block for block in range(start, end) if block not in held]
