"""The client's view of the swarm: a client-mode DHT node, the model's identity, and a snapshot of the
announced servers that a background thread keeps fresh, so no look-up ever runs on the per-token path.

Each refresh also pings (the cheap ``Info`` RPC) the online servers not measured recently: the round
trip goes into ``ServerTrust`` for routing, and a server that announces itself but does not answer
is avoided for a while.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import hivemind

from shardnet.client.transport import Transport
from shardnet.client.trust import ServerTrust
from shardnet.dht import ServerState, ServerView, lookup, start_dht
from shardnet.errors import ConfigError, ShardnetError
from shardnet.models import derive_model_id, load_config, validate_model_id
from shardnet.swarm_key import SwarmKey
from shardnet.wire import pb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwarmSnapshot:
    servers: tuple[ServerView, ...]  # one per peer id, whatever its state
    taken_at: float  # time.monotonic() of the look-up


def distinct_servers(per_block: list[list[ServerView]]) -> tuple[ServerView, ...]:
    """One view per peer id (the freshest) from a per-block look-up."""
    seen: dict[str, ServerView] = {}
    for views in per_block:
        for view in views:
            known = seen.get(view.record.peer_id)
            if known is None or view.expiration_time > known.expiration_time:
                seen[view.record.peer_id] = view
    return tuple(seen.values())


class SwarmView:
    def __init__(
        self,
        dht: hivemind.DHT,
        model_id: str,
        num_blocks: int,
        owns_dht: bool,
        health: ServerTrust | None = None,
        transport: Transport | None = None,
        refresh_interval_s: float = 10.0,
        ping_interval_s: float = 60.0,
        ping_timeout_s: float = 2.0,
    ):
        self.dht = dht
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.health = health or ServerTrust.shared()
        self.transport = transport  # None: no pings (e.g. `shardnet status`)
        self.refresh_interval_s = refresh_interval_s
        self.ping_interval_s = ping_interval_s  # re-measure a server's RTT after this long
        self.ping_timeout_s = ping_timeout_s
        self._owns_dht = owns_dht
        self._snapshot: SwarmSnapshot | None = None
        self._refresh_lock = threading.Lock()
        self._pinged_at: dict[str, float] = {}
        self._pings = ThreadPoolExecutor(8, thread_name_prefix="shardnet-ping") if transport else None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def connect(
        cls,
        model_path: str | Path,
        initial_peers: Sequence[str],
        model_id: str | None = None,
        dht: hivemind.DHT | None = None,
        swarm_key: SwarmKey | None = None,
        **options,
    ) -> SwarmView:
        """``swarm_key``: a private swarm's; a ``dht`` passed in must have been started with the same key."""
        config = load_config(model_path)
        model_id = validate_model_id(model_id or derive_model_id(config))
        num_blocks = int(config.num_hidden_layers)
        owns = dht is None
        if dht is None:
            dht = start_dht(
                initial_peers, client_mode=True, model_id=model_id, num_blocks=num_blocks, swarm_key=swarm_key
            )
        elif (swarm_key is None) != (getattr(dht, "swarm_key", None) is None):
            raise ConfigError(
                "the DHT node passed in and swarm_key disagree on whether the swarm is private: start the node "
                "with start_dht(..., swarm_key=...) and pass the same key"
            )
        return cls(dht, model_id, num_blocks, owns, **options)

    def servers(self) -> list[list[ServerView]]:
        """Per block, every valid, unexpired record, looked up now."""
        return lookup(self.dht, self.model_id, self.num_blocks)

    # ---- the snapshot ----

    def snapshot(self) -> SwarmSnapshot:
        """The latest snapshot; the first call looks the swarm up (and starts the background refresh)."""
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = self.refresh()
            self.start_background_refresh()
        return snapshot

    def refresh(self, max_age_s: float = 0.0) -> SwarmSnapshot:
        """Look the swarm up now, unless a snapshot at most ``max_age_s`` old exists (or is being taken)."""
        asked = time.monotonic()
        with self._refresh_lock:
            snapshot = self._snapshot
            if snapshot is not None and snapshot.taken_at >= asked - max_age_s:
                return snapshot  # another thread refreshed while we waited for the lock
            taken_at = time.monotonic()
            servers = distinct_servers(self.servers())
            self._ping(servers)
            self._snapshot = SwarmSnapshot(servers, taken_at)
            return self._snapshot

    def request_refresh(self) -> None:
        """Ask the background thread for a refresh now, without waiting for it."""
        self._wake.set()

    def start_background_refresh(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._refresh_forever, name="shardnet-swarm", daemon=True)
            self._thread.start()

    def _refresh_forever(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.refresh_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh(max_age_s=self.refresh_interval_s / 2)
            except Exception as exc:  # a DHT hiccup keeps the last snapshot; the next round retries
                logger.warning("swarm refresh failed (keeping the last view): %s", exc)

    # ---- round trips ----

    def _ping(self, servers: Sequence[ServerView]) -> None:
        """Measure the RTT of online servers not measured recently, in parallel, within the ping timeout."""
        if self._pings is None:
            return
        now = time.monotonic()
        due = [
            view
            for view in servers
            if view.record.state == ServerState.ONLINE.value
            and now - self._pinged_at.get(view.record.peer_id, -1e9) > self.ping_interval_s
        ]
        for view in due:
            self._pinged_at[view.record.peer_id] = now
        for future in [self._pings.submit(self._ping_one, view) for view in due]:
            future.result()

    def _ping_one(self, view: ServerView) -> None:
        try:
            stub = self.transport.stub(view.address, view.record.tls_fingerprint)
            clock = self.health.clock(view.record.peer_id)  # both calls date the server's clock (timings)
            for _ in range(2):  # the first call opens the connection: the RTT is the second's
                began = time.perf_counter()
                reply = stub.Info(pb.InfoRequest(), timeout=self.ping_timeout_s)
                answered = time.perf_counter()
                clock.add(began, reply.arrived_at_s, reply.replied_at_s, answered)
            self.health.record_rtt(view.record.peer_id, answered - began)
        except grpc.RpcError as exc:
            self.health.report_failure(view.record.peer_id, f"does not answer pings ({exc.code().name})")
        except ShardnetError as exc:  # e.g. its TLS certificate is not the one it announced
            self.health.report_failure(view.record.peer_id, str(exc))

    # ---- lifetime ----

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._pings is not None:
            self._pings.shutdown(wait=False, cancel_futures=True)
        if self._owns_dht:
            self.dht.shutdown()

    def __enter__(self) -> SwarmView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
