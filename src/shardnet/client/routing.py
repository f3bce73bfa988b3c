"""Choosing a chain of servers that covers every block, from a per-block list of servers."""

from __future__ import annotations

from dataclasses import dataclass

from shardnet.dht import ServerView


@dataclass(frozen=True)
class RouteHop:
    server: ServerView
    start: int  # first block this hop runs (inclusive)
    end: int  # one past the last block this hop runs


def choose_route(per_block: list[list[ServerView]]) -> list[RouteHop] | None:
    """Fewest hops: from each block, take the server that reaches furthest (faster one on a tie).

    Returns None if some block has no server. Greedy furthest-reach is optimal for covering a line
    with intervals, so the route has the fewest hops possible.
    """
    route: list[RouteHop] = []
    block, total = 0, len(per_block)
    while block < total:
        candidates = per_block[block]
        if not candidates:
            return None
        best = max(candidates, key=lambda v: (v.record.end, v.record.throughput))
        end = min(best.record.end, total)
        route.append(RouteHop(best, block, end))
        block = end
    return route


def missing_blocks(per_block: list[list[ServerView]]) -> list[int]:
    return [block for block, views in enumerate(per_block) if not views]
