"""RoutePlanner: which announced servers a client may use, and the cheapest chain over some blocks.

It filters the swarm view's snapshot (online, same protocol and dtype, allowed and not blocked by the
user, not banned after failures, room for the session's batch, length and cache), prices each server
(``routing.hop_costs``) and searches (``routing.cheapest_route``). When no chain exists it refreshes
the view and waits, up to the route timeout, before raising a ``RouteNotFoundError`` that names the
blocks nobody usable holds and why the servers that hold them were passed over.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from shardnet.client.config import ClientConfig
from shardnet.client.routing import CostModel, RouteHop, cheapest_route, hop_costs, missing_blocks
from shardnet.client.swarm_view import SwarmView
from shardnet.client.trust import ServerTrust
from shardnet.dht import ServerState, ServerView
from shardnet.errors import RouteNotFoundError, ShardnetError
from shardnet.wire import PROTOCOL_VERSION

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionNeeds:
    """What a route's servers must have room for; max_length 0 = a stateless forward (no cache)."""

    batch_size: int = 1
    max_length: int = 0

    @property
    def cache_tokens(self) -> int:
        return self.batch_size * self.max_length


class RoutePlanner:
    def __init__(
        self,
        view: SwarmView,
        health: ServerTrust,
        config: ClientConfig,
        cost_model: CostModel | None = None,
    ):
        self.view = view
        self.health = health
        self.config = config
        self.cost_model = cost_model or CostModel()

    def _unusable_reason(
        self, view: ServerView, needs: SessionNeeds, banned: frozenset[str], exclude: frozenset[str]
    ) -> str | None:
        """Why a server cannot take this route's work, or None if it can."""
        record, config = view.record, self.config
        if record.state != ServerState.ONLINE.value:
            return record.state
        if record.protocol != PROTOCOL_VERSION:
            return f"protocol {record.protocol}"
        if record.dtype != config.dtype_name:
            return f"dtype {record.dtype}"
        if record.quant not in config.quant:
            return f"quant {record.quant}"
        if config.allowed_servers is not None and record.peer_id not in config.allowed_servers:
            return "not in allowed_servers"
        if config.active_adapter and config.active_adapter not in record.adapters:
            return f"no adapter {config.active_adapter}"
        if record.peer_id in config.blocked_servers:
            return "in blocked_servers"
        if record.peer_id in exclude:
            return "failed during this request"
        if record.peer_id in banned:
            return "failed recently"
        if needs.max_length:
            if record.max_length and record.max_length < needs.max_length:
                return f"max_length {record.max_length}"
            if record.max_batch_size and record.max_batch_size < needs.batch_size:
                return f"max_batch_size {record.max_batch_size}"
            if record.cache_tokens_free < needs.cache_tokens:
                return "not enough free cache"
        return None

    def holders(
        self, start: int, end: int, needs: SessionNeeds, exclude: frozenset[str] = frozenset()
    ) -> list[str]:
        """Peer ids of the usable servers that hold every block ``start:end`` on their own."""
        banned = self.health.banned()
        return sorted(
            view.record.peer_id
            for view in self.view.snapshot().servers
            if view.record.start <= start
            and end <= view.record.end
            and self._unusable_reason(view, needs, banned, exclude) is None
        )

    def try_route(
        self, start: int, end: int, needs: SessionNeeds, exclude: frozenset[str] = frozenset()
    ) -> list[RouteHop] | None:
        """The cheapest route over the current snapshot, or None if some block has no usable server."""
        banned = self.health.banned()
        usable = [
            view
            for view in self.view.snapshot().servers
            if self._unusable_reason(view, needs, banned, exclude) is None
        ]
        costs = hop_costs(usable, self.health.rtts(), self.health.open_sessions(), self.cost_model)
        return cheapest_route(usable, costs, start, end)

    def route(
        self,
        start: int,
        end: int,
        needs: SessionNeeds = SessionNeeds(),
        reserve: bool = False,
        exclude: frozenset[str] = frozenset(),
    ) -> list[RouteHop]:
        """A route over blocks ``start:end``; waits (refreshing the view) up to the route timeout.

        ``exclude``: peer ids not to use while others can serve (those that failed the request at hand);
        when nobody else holds some block, they are used again once their ban is over.
        ``reserve``: count a session on each hop's server at once (``ServerTrust.session_opened``), so
        that routes chosen at the same moment by other threads spread over replicas; the caller calls
        ``session_closed`` for each hop when its session ends or fails to open.
        """
        deadline = time.monotonic() + self.config.route_timeout_s
        delay = 0.1
        while True:
            with self.health.routing_lock:
                route = self.try_route(start, end, needs, exclude)
                if route is None and exclude:
                    # The only holders of some blocks failed this request: once their bans are over,
                    # they are tried again rather than waiting out the route timeout for someone else
                    # (a client link cut for a few seconds, a server that froze and came back).
                    route = self.try_route(start, end, needs)
                if route is not None and reserve:
                    for hop in route:
                        self.health.session_opened(hop.peer_id)
            if route is not None:
                return route
            now = time.monotonic()
            if now >= deadline:
                raise self._not_found(start, end, needs, exclude)
            unban = self.health.next_unban_s()
            wait = min(delay, deadline - now, unban + 0.01 if unban is not None else delay)
            time.sleep(max(wait, 0.01))
            delay = min(delay * 2, 2.0)
            try:
                self.view.refresh(max_age_s=delay / 2)
            except ShardnetError as exc:  # keep the last snapshot and go on waiting
                logger.warning("swarm refresh failed while waiting for a route: %s", exc)

    def _not_found(
        self, start: int, end: int, needs: SessionNeeds, exclude: frozenset[str]
    ) -> RouteNotFoundError:
        banned = self.health.banned()
        servers = self.view.snapshot().servers
        usable = [v for v in servers if self._unusable_reason(v, needs, banned, exclude) is None]
        missing = missing_blocks(usable, start, end)
        reasons = Counter(
            reason
            for view in servers
            if any(view.record.start <= block < view.record.end for block in missing)
            and (reason := self._unusable_reason(view, needs, banned, exclude)) is not None
        )
        why = ", ".join(f"{count} server(s) {reason}" for reason, count in reasons.most_common())
        return RouteNotFoundError(
            self.view.model_id,
            missing,
            f"after {self.config.route_timeout_s:g}s; holders passed over: {why}" if why else "",
        )
