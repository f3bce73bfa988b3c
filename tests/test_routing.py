"""Route search on hand-made swarms (records only): cheapest chains, partial spans, spreading, gaps."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from shardnet.client.history import GrowingBuffer
from shardnet.client.routing import CostModel, HopCost, cheapest_route, hop_costs, missing_blocks
from shardnet.dht import ServerView
from shardnet.errors import GenerationError

from .conftest import server_view

NO_JITTER = CostModel(jitter=0.0)


def server(peer: str, start: int, end: int, throughput: float = 10.0, **fields) -> ServerView:
    fields.setdefault("cache_tokens_free", 1000)
    fields.setdefault("cache_tokens_total", 1000)
    return server_view(peer, start, end, throughput=throughput, **fields)


def spans(route) -> list[tuple[str, int, int]]:
    return [(hop.peer_id, hop.start, hop.end) for hop in route]


def route_of(servers, start=0, end=6, rtts=None, sessions=None, model=NO_JITTER, rng=None):
    costs = hop_costs(servers, rtts or {}, sessions or {}, model, rng)
    return cheapest_route(servers, costs, start, end)


def test_fewer_hops_win_when_servers_are_alike():
    servers = [server("a", 0, 3), server("b", 3, 6), server("c", 0, 6, throughput=5.0)]
    assert spans(route_of(servers)) == [("c", 0, 6)]


def test_a_slow_server_loses_to_two_fast_ones():
    servers = [server("a", 0, 3, 100.0), server("b", 3, 6, 100.0), server("c", 0, 6, throughput=0.5)]
    assert spans(route_of(servers)) == [("a", 0, 3), ("b", 3, 6)]


def test_a_far_server_loses_to_two_near_ones():
    servers = [server("a", 0, 3), server("b", 3, 6), server("c", 0, 6, throughput=5.0)]
    assert spans(route_of(servers, rtts={"a": 0.001, "b": 0.001, "c": 0.5})) == [("a", 0, 3), ("b", 3, 6)]


def test_route_uses_part_of_a_span_when_spans_do_not_line_up():
    servers = [server("a", 0, 4), server("b", 2, 7), server("c", 5, 9)]
    route = route_of(servers, end=9)
    assert [(hop.start, hop.end) for hop in route][0][0] == 0 and route[-1].end == 9
    assert all(a.end == b.start for a, b in zip(route, route[1:], strict=False))
    assert spans(route) in ([("a", 0, 4), ("b", 4, 7), ("c", 7, 9)], [("a", 0, 2), ("b", 2, 7), ("c", 7, 9)])


def test_sub_span_route_for_a_failed_hop():
    servers = [server("x", 0, 2), server("y", 2, 5), server("z", 3, 6)]
    assert spans(route_of(servers, start=0, end=3)) == [("x", 0, 2), ("y", 2, 3)]


def test_busy_server_is_avoided_and_local_sessions_count():
    servers = [server("a", 0, 6), server("b", 0, 6, open_sessions=4)]
    assert spans(route_of(servers)) == [("a", 0, 6)]
    assert spans(route_of(servers, sessions={"a": 9})) == [("b", 0, 6)]


def test_near_best_replicas_share_the_load():
    servers = [server("a", 0, 3), server("a2", 0, 3, 9.0), server("b", 3, 6), server("b2", 3, 6, 11.0)]
    rng = random.Random(0)
    picks = Counter(
        tuple(hop.peer_id for hop in route_of(servers, model=CostModel(), rng=rng)) for _ in range(400)
    )
    firsts = Counter(first for first, _ in picks.elements())
    seconds = Counter(second for _, second in picks.elements())
    assert min(firsts.values()) > 80 and min(seconds.values()) > 80, picks


def test_gap_gives_no_route_and_names_missing_blocks():
    servers = [server("a", 0, 2), server("b", 4, 6)]
    assert route_of(servers) is None
    assert missing_blocks(servers, 0, 6) == [2, 3]
    assert cheapest_route([], [], 0, 1) is None


def test_cheapest_route_is_optimal_against_brute_force():
    rng = random.Random(7)
    for _ in range(200):
        servers = []
        for index in range(rng.randint(1, 7)):
            start = rng.randint(0, 7)
            servers.append(server(f"s{index}", start, rng.randint(start + 1, 8)))
        costs = [HopCost(rng.uniform(0, 1), rng.uniform(0, 1)) for _ in servers]
        route = cheapest_route(servers, costs, 0, 8)
        best = _brute_force(servers, costs, 0, 8)
        if best is None:
            assert route is None
            continue
        cost = sum(
            costs[[s.record.peer_id for s in servers].index(hop.peer_id)].fixed_s
            + (hop.end - hop.start)
            * costs[[s.record.peer_id for s in servers].index(hop.peer_id)].per_block_s
            for hop in route
        )
        assert cost == pytest.approx(best)


def _brute_force(servers, costs, start, end):
    best = {start: 0.0}
    for boundary in range(start + 1, end + 1):
        options = [
            best[a] + cost.fixed_s + (boundary - a) * cost.per_block_s
            for view, cost in zip(servers, costs, strict=True)
            for a in range(max(view.record.start, start), boundary)
            if a in best and view.record.end >= boundary
        ]
        if options:
            best[boundary] = min(options)
    return best.get(end)


def test_replay_history_is_bounded_by_max_length():
    buffer = GrowingBuffer(capacity=10, initial=2)
    for position in range(10):
        buffer.append(torch.full((2, 1, 3), float(position)))
    assert buffer.view().shape == (2, 10, 3)
    assert buffer.view()[0, :, 0].tolist() == [float(p) for p in range(10)]
    with pytest.raises(GenerationError, match="exceeds"):
        buffer.append(torch.zeros(2, 1, 3))
