"""The failover policy on hand-made swarms (records only, no servers): what is charged, who is banned and
for how long, the step budgets, and routing around servers that failed the request at hand."""

from __future__ import annotations

import time

import pytest

from shardnet.client.config import ClientConfig
from shardnet.client.failover import HEDGE_FACTOR, Failover
from shardnet.client.planner import RoutePlanner
from shardnet.client.routing import RouteHop
from shardnet.client.swarm_view import SwarmSnapshot
from shardnet.client.trust import ServerTrust
from shardnet.errors import (
    InvalidRequestError,
    RemoteError,
    RouteNotFoundError,
    ServerUnavailableError,
    SessionError,
    SessionExpiredError,
    StepTimeoutError,
)

from .conftest import server_view


class FixedView:
    """A swarm view that always shows the same records (what the planner reads)."""

    model_id = "llama_test"

    def __init__(self, servers):
        self._snapshot = SwarmSnapshot(tuple(servers), time.monotonic())

    def snapshot(self) -> SwarmSnapshot:
        return self._snapshot

    def refresh(self, max_age_s: float = 0.0) -> SwarmSnapshot:
        return self._snapshot


def hop(peer: str, start: int = 0, end: int = 3, throughput: float = 100.0) -> RouteHop:
    return RouteHop(server_view(peer, start, end, throughput=throughput), start, end)


def test_a_server_unreachable_when_opened_is_not_charged_but_a_failover_is():
    config = ClientConfig(max_retries=1)
    failover = Failover(config, ServerTrust(), "test")
    for peer in "abcde":  # stale records of dead servers: each skipped, none charged
        failover.failed(hop(peer), ServerUnavailableError("Connection refused"), opening=True)
    assert failover.failures == 0 and failover.excluded == frozenset("abcde")
    failover.failed(hop("f"), RemoteError("Stream removed"))  # a hop that was serving: charged
    with pytest.raises(RemoteError):
        failover.failed(hop("g"), RemoteError("Stream removed"))  # past max_retries: raised


def test_what_no_retry_fixes_is_raised_and_a_session_gone_bans_nobody():
    health = ServerTrust()
    failover = Failover(ClientConfig(), health, "test")
    with pytest.raises(InvalidRequestError):
        failover.failed(hop("a"), InvalidRequestError("bad shape"))
    failover.failed(hop("b"), SessionExpiredError("reclaimed while idle"))
    failover.failed(hop("c"), SessionError("push to a session that is not open here"))
    assert health.banned() == frozenset() and failover.excluded == frozenset()
    failover.failed(hop("d"), StepTimeoutError("no answer within 3.0s"))
    assert health.banned() == {"d"} and health.counts()["hedges"] == 1


def test_failures_seen_during_one_ban_do_not_double_it():
    health = ServerTrust(ban_base_s=0.2)
    for _ in range(4):  # four sessions saw the same outage at once
        assert health.report_failure("a", "outage") == pytest.approx(0.2)
    time.sleep(0.25)
    assert health.report_failure("a", "again, after the ban") == pytest.approx(0.4)


def test_a_step_budget_is_four_expected_steps_within_the_floor_and_the_request_timeout():
    health = ServerTrust()
    config = ClientConfig(hedge_floor_s=3.0, request_timeout_s=120.0)
    failover = Failover(config, health, "test")
    assert failover.budget_s(hop("a", throughput=100.0), 1) == 3.0  # 10 ms a step: the floor
    assert failover.budget_s(hop("a", throughput=100.0), 1000) == pytest.approx(HEDGE_FACTOR * 10.0)
    assert failover.budget_s(hop("a", throughput=100.0), 100_000) == 120.0
    slow = failover.budget_s(hop("a", throughput=100.0), 20, recent_s=0.5)  # it has been slow lately
    assert slow == pytest.approx(HEDGE_FACTOR * 10.0)
    health.record_rtt("b", 2.0)  # a far server
    assert failover.budget_s(hop("b", throughput=100.0), 1) == pytest.approx(HEDGE_FACTOR * 2.01)


def test_servers_that_failed_the_request_are_used_again_when_nobody_else_holds_their_blocks():
    only = server_view("only", 0, 3, throughput=100.0)
    other = server_view("other", 0, 3, throughput=1.0)
    config = ClientConfig(route_timeout_s=0.5)
    planner = RoutePlanner(FixedView([only, other]), ServerTrust(), config)
    assert [h.peer_id for h in planner.route(0, 3, exclude=frozenset({"only"}))] == ["other"]
    alone = RoutePlanner(FixedView([only]), ServerTrust(), config)
    assert [h.peer_id for h in alone.route(0, 3, exclude=frozenset({"only"}))] == ["only"]
    banned = ServerTrust()
    banned.report_failure("only", "down")
    began = time.monotonic()
    route = RoutePlanner(FixedView([only]), banned, ClientConfig(route_timeout_s=5.0)).route(
        0, 3, exclude=frozenset({"only"})
    )
    assert [h.peer_id for h in route] == ["only"] and time.monotonic() - began >= 0.9  # after its ban
    with pytest.raises(RouteNotFoundError):
        RoutePlanner(FixedView([only]), ServerTrust(), config).route(3, 6)
