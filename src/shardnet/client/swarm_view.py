"""The client's view of the swarm: a client-mode DHT node, the model's identity, and look-ups."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import hivemind
import torch

from shardnet.client.routing import RouteHop, choose_route, missing_blocks
from shardnet.dht import ServerState, ServerView, lookup, start_dht
from shardnet.errors import RouteNotFoundError, format_blocks
from shardnet.models import derive_model_id, load_config, validate_model_id
from shardnet.wire import PROTOCOL_VERSION

logger = logging.getLogger(__name__)


class SwarmView:
    def __init__(self, dht: hivemind.DHT, model_id: str, num_blocks: int, owns_dht: bool):
        self.dht = dht
        self.model_id = model_id
        self.num_blocks = num_blocks
        self._owns_dht = owns_dht

    @classmethod
    def connect(
        cls,
        model_path: str | Path,
        initial_peers: Sequence[str],
        model_id: str | None = None,
        dht: hivemind.DHT | None = None,
    ) -> SwarmView:
        config = load_config(model_path)
        model_id = validate_model_id(model_id or derive_model_id(config))
        num_blocks = int(config.num_hidden_layers)
        owns = dht is None
        if dht is None:
            dht = start_dht(initial_peers, client_mode=True, model_id=model_id, num_blocks=num_blocks)
        return cls(dht, model_id, num_blocks, owns)

    def servers(self) -> list[list[ServerView]]:
        """Per block, every valid, unexpired record."""
        return lookup(self.dht, self.model_id, self.num_blocks)

    def route(
        self, dtype: torch.dtype, timeout_s: float, exclude: frozenset[str] = frozenset()
    ) -> list[RouteHop]:
        """A chain covering every block; polls the DHT until ``timeout_s`` before giving up."""
        dtype_name = str(dtype).removeprefix("torch.")
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        while True:
            per_block = [
                [v for v in views if _usable(v, dtype_name) and v.record.peer_id not in exclude]
                for views in self.servers()
            ]
            route = choose_route(per_block)
            if route is not None:
                logger.info(
                    "route model=%s %s",
                    self.model_id,
                    " -> ".join(f"{h.start}:{h.end}@{h.server.short_id}" for h in route),
                )
                return route
            if time.monotonic() + delay > deadline:
                raise RouteNotFoundError(self.model_id, missing_blocks(per_block))
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def render(self) -> str:
        """A table of servers and the blocks nobody serves, for ``shardnet status``."""
        seen: dict[str, ServerView] = {}
        per_block = self.servers()
        for views in per_block:
            for view in views:
                seen.setdefault(view.record.peer_id, view)
        lines = [f"model {self.model_id}: {self.num_blocks} blocks, {len(seen)} servers"]
        lines.append(
            f"{'peer':<14}{'address':<24}{'blocks':<10}{'state':<10}{'dtype':<10}{'steps/s':>9}{'cache free':>12}"
        )
        for view in sorted(seen.values(), key=lambda v: (v.record.start, v.record.end)):
            r = view.record
            lines.append(
                f"{view.short_id:<14}{view.address:<24}{f'{r.start}:{r.end}':<10}{r.state:<10}{r.dtype:<10}"
                f"{r.throughput:>9.1f}{r.cache_tokens_free:>12}"
            )
        online = [[v for v in views if v.record.state == ServerState.ONLINE.value] for views in per_block]
        missing = missing_blocks(online)
        lines.append(
            f"blocks with no online server: {format_blocks(missing)}" if missing else "all blocks covered"
        )
        return "\n".join(lines)

    def close(self) -> None:
        if self._owns_dht:
            self.dht.shutdown()

    def __enter__(self) -> SwarmView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _usable(view: ServerView, dtype_name: str) -> bool:
    r = view.record
    return r.state == ServerState.ONLINE.value and r.protocol == PROTOCOL_VERSION and r.dtype == dtype_name
