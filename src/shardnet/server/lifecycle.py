"""A running server's transitions, and the two policies that call them.

Transitions, one at a time (a lock):
- ``go_online``: load the span (``server/loading.py``), probe it, announce ONLINE;
- ``drain``: announce DRAINING, refuse new work, hand open sessions over as their next steps come
  (``server/handoff.py``), give them up to ``--drain-timeout`` (SIGTERM ends this way too);
- ``rest`` (headroom below ``--headroom-off``): drain, end the sessions still open (their clients
  replay elsewhere), free the weights, prefixes and caches, announce RESTING, and stay up: the DHT node
  and gRPC answer, calls get UNAVAILABLE;
- ``resume`` (headroom above ``--headroom-on``): choose again with ``--num-blocks`` (else the same span),
  announce JOINING, load, announce ONLINE;
- ``move`` (rebalancing, ``server/rebalance.py``): claim the new span at once (a JOINING record there, with
  our speed, so a server deciding at the same moment sees the hole taken), drain and free as a rest
  does, clear the old span (OFFLINE there), load the new one, announce ONLINE.

The policies: ``watch_headroom`` polls the headroom file (``server/headroom.py``); ``watch_balance``
checks every jittered ``--rebalance-period`` whether moving lifts the weakest block by enough, waits a
random delay, and moves only if a fresh look-up still says so. A resting server does not rebalance.
"""

from __future__ import annotations

import asyncio
import logging
import time

from shardnet.dht import ServerState, lookup
from shardnet.errors import ShardnetError
from shardnet.server.announcer import Announcer
from shardnet.server.config import ServerConfig
from shardnet.server.headroom import Decision, HeadroomFile, HeadroomPolicy, poll_interval_s
from shardnet.server.loading import Held, SpanLoader
from shardnet.server.placement import FirstLook, Placement
from shardnet.server.rebalance import Move, better_span, next_check_s, recheck_delay_s
from shardnet.server.servicer import ServerRuntime

logger = logging.getLogger(__name__)
END_SESSIONS_S = 5.0  # after a drain, how long cancelled sessions' handlers get to close them


class Lifecycle:
    def __init__(
        self,
        config: ServerConfig,
        runtime: ServerRuntime,
        announcer: Announcer,
        loader: SpanLoader,
        span: tuple[int, int],
        placement: Placement | None,
        own_peer_id: str,
        stopping: asyncio.Event,
    ):
        self.config = config
        self.runtime = runtime
        self.announcer = announcer
        self.loader = loader
        self.span = span  # what this server serves, or will serve once loaded (half-open)
        self.weight_digests: list[str] = []  # one per block while loaded (announced)
        self.placement = placement  # None for --blocks: the span never changes
        self.own_peer_id = own_peer_id
        self.stopping = stopping  # set when the server is to stop (a signal, or a failed transition)
        self._lock = asyncio.Lock()
        self._watchers: list[asyncio.Task] = []

    # ---- transitions ----

    async def go_online(self) -> tuple[float, float]:
        """Load the span, announce ONLINE; returns (seconds taken, probed steps/s)."""
        began = time.perf_counter()
        backend, digests, throughput = await self.loader.load(self.span)
        self.runtime.backend, self.weight_digests = backend, digests
        self.runtime.state = ServerState.ONLINE
        await self.announcer.announce_now()
        return time.perf_counter() - began, throughput

    async def settle(self, first: FirstLook) -> None:
        """--num-blocks: look again once announced; move (before loading anything) if a server that chose
        at the same moment took our span."""
        try:
            await asyncio.wait_for(self.stopping.wait(), self.placement.settle_delay_s(first))
            return  # stopping: no need to move
        except asyncio.TimeoutError:
            pass
        span = await asyncio.to_thread(self.placement.settle, first, self.own_peer_id)
        if span != self.span:
            await self._switch_span(span)
            await self.announcer.announce_now()  # JOINING, on the new span

    async def drain(self) -> None:
        """Refuse new work, tell the DHT, and give open sessions up to drain_timeout_s to finish (each is
        handed to another holder when its next step comes)."""
        self.runtime.state = ServerState.DRAINING
        await self.announcer.announce_now()
        deadline = time.monotonic() + self.config.drain_timeout_s
        if len(self.runtime.sessions):
            logger.info(
                "draining: %d open sessions, up to %.0fs",
                len(self.runtime.sessions),
                self.config.drain_timeout_s,
            )
        while len(self.runtime.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def rest(self, why: str) -> None:
        async with self._lock:
            if self.runtime.state != ServerState.ONLINE:
                return
            logger.info("resting: %s; draining blocks %d:%d", why, *self.span)
            await self._leave()
            self.runtime.state = ServerState.RESTING
            await self.announcer.announce_now()

    async def resume(self, why: str) -> None:
        async with self._lock:
            if self.runtime.state != ServerState.RESTING:
                return
            logger.info("resuming: %s", why)
            first = None
            if self.placement is not None:  # --num-blocks: the swarm may need other blocks by now
                first = await asyncio.to_thread(self.placement.first_look)
                await self._switch_span(first.span)
            self.runtime.state = ServerState.JOINING
            await self.announcer.announce_now()
            if first is not None:
                await self.settle(first)
            load_s, throughput = await self.go_online()
            logger.info(
                "serving again: blocks=%d:%d load=%.1fs throughput=%.1f steps/s",
                *self.span,
                load_s,
                throughput,
            )

    async def move(self, target: tuple[int, int]) -> None:
        async with self._lock:
            if self.runtime.state != ServerState.ONLINE or target == self.span:
                return
            old = self.span
            logger.info("moving from blocks %d:%d to %d:%d", *old, *target)
            claim = self.announcer.make_record().copy(
                update={
                    "state": ServerState.JOINING.value,
                    "start": target[0],
                    "end": target[1],
                    "weight_digests": [],
                    "open_sessions": 0,
                }
            )
            await self.announcer.announce_record(claim)  # others deciding now see the hole taken
            await self._leave()
            await self._switch_span(target)
            self.runtime.state = ServerState.JOINING
            await self.announcer.announce_now()
            load_s, throughput = await self.go_online()
            logger.info(
                "moved from blocks %d:%d to %d:%d: load=%.1fs throughput=%.1f steps/s",
                *old,
                *target,
                load_s,
                throughput,
            )

    async def _leave(self) -> None:
        """Drain, end the sessions still open, and free the span."""
        await self.drain()
        await self._end_sessions()
        backend, self.runtime.backend = self.runtime.backend, None
        self.weight_digests = []
        if backend is None:
            return
        held = Held.of(backend)
        del backend
        freed = await asyncio.to_thread(self.loader.release, held)
        logger.info(
            "freed blocks %d:%d: %.1f MiB of weights, prefixes and caches; span collected=%s",
            *self.span,
            freed.weight_bytes / 2**20,
            freed.collected,
        )

    async def _end_sessions(self) -> None:
        """Cancel the streams of the sessions the drain left open: their clients replay elsewhere."""
        sessions = self.runtime.sessions
        deadline = time.monotonic() + END_SESSIONS_S
        ended = 0
        while len(sessions) and time.monotonic() < deadline:
            for session in sessions.take_idle(0.0):  # every session not mid-step, marked reclaimed
                ended += 1
                try:
                    session.cancel()
                except Exception as exc:  # the stream may be ending already; its handler frees it
                    logger.debug("cancelling session=%s: %s", session.short_id, exc)
            await asyncio.sleep(0.05)
        if ended:
            logger.info("ended %d sessions still open after the drain: their clients replay elsewhere", ended)
        if len(sessions):
            logger.warning("%d sessions did not close within %.0fs", len(sessions), END_SESSIONS_S)

    async def _switch_span(self, span: tuple[int, int]) -> None:
        """Serve ``span`` from now on; the old span's blocks get an OFFLINE record, not a stale one."""
        if span == self.span:
            return
        gone = self.announcer.make_record().copy(update={"state": ServerState.OFFLINE.value})
        await self.announcer.announce_record(gone)
        self.span = span

    # ---- policies ----

    def start_watchers(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if cfg.headroom_file is not None:
            on, off, window_s = cfg.headroom
            policy = HeadroomPolicy(on, off, window_s)
            source = HeadroomFile(cfg.headroom_file)
            self._watchers.append(loop.create_task(self._guarded(self.watch_headroom(source, policy))))
        if cfg.rebalances and self.placement is not None:
            self._watchers.append(loop.create_task(self._guarded(self.watch_balance())))

    async def stop_watchers(self) -> None:
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._watchers.clear()

    async def _guarded(self, watcher) -> None:
        """A transition that fails leaves the server in no state to serve: it stops (and says why)."""
        try:
            await watcher
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("a server transition failed; stopping the server")
            self.stopping.set()

    async def watch_headroom(self, source: HeadroomFile, policy: HeadroomPolicy) -> None:
        interval_s = poll_interval_s(policy.window_s)
        logger.info(
            "headroom policy: %s, rest below %.2f, serve above %.2f, mean over %.0fs",
            source.path,
            policy.off,
            policy.on,
            policy.window_s,
        )
        while True:
            await asyncio.sleep(interval_s)
            policy.observe(await asyncio.to_thread(source.read))
            decision = policy.decide()
            if decision is Decision.STAY:
                continue
            mean = policy.mean()
            if decision is Decision.REST:
                await self.rest(f"headroom mean {mean:.3f} < {policy.off:.2f} over {policy.window_s:g}s")
            else:
                await self.resume(f"headroom mean {mean:.3f} > {policy.on:.2f} over {policy.window_s:g}s")

    async def watch_balance(self) -> None:
        period_s = self.config.rebalance_period_s
        while True:
            await asyncio.sleep(next_check_s(period_s))
            if self.runtime.state != ServerState.ONLINE:
                continue  # resting, or busy with another transition
            move = await self._better_span()
            if move is None:
                continue
            await asyncio.sleep(recheck_delay_s(period_s))  # a server deciding with us moves first, or we do
            again = await self._better_span()
            if again is None:
                logger.info("not moving to blocks %d:%d: a fresh look says stay", *move.target)
                continue
            await self.move(again.target)

    async def _better_span(self) -> Move | None:
        if self.runtime.state != ServerState.ONLINE:
            return None
        placement = self.placement
        try:
            per_block = await asyncio.to_thread(
                lookup, self.announcer.dht, placement.model_id, placement.model_blocks
            )
        except ShardnetError as exc:  # a DHT hiccup: look again next period
            logger.warning("rebalancing look-up failed (next period retries): %s", exc)
            return None
        return better_span(per_block, self.own_peer_id, self.span, placement.peers)
