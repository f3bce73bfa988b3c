"""Composition root of a server: resolve its device and dtype and check that the span fits, start the
DHT, place the span (--num-blocks), start gRPC, announce, go online, drain on a signal. What happens in
between (rest and resume on the headroom policy, moves to weaker blocks) is ``server/lifecycle.py``."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import torch

from shardnet.devices import (
    describe_device,
    dtype_name,
    free_memory_bytes,
    make_current,
    resolve_device,
    resolve_dtype,
)
from shardnet.dht import ServerRecord, ServerState, ServerView, lookup, start_dht, visible_maddrs
from shardnet.errors import ConfigError
from shardnet.models import (
    Checkpoint,
    adapter_for,
    block_count,
    derive_model_id,
    load_config,
    validate_model_id,
)
from shardnet.models.footprint import block_weight_bytes, kv_bytes_per_token
from shardnet.models.quantization import check_quant_supported
from shardnet.server.announcer import Announcer, LoadTrigger
from shardnet.server.block_choice import Peers
from shardnet.server.compute_queue import ComputeQueue
from shardnet.server.compute_threads import ComputeThreads
from shardnet.server.config import ServerConfig
from shardnet.server.fit import GIB, SpanFootprint, check_fit
from shardnet.server.handoff import HandOff
from shardnet.server.lifecycle import Lifecycle
from shardnet.server.loading import SpanLoader
from shardnet.server.metrics import ServerMetrics
from shardnet.server.placement import Placement
from shardnet.server.push import PushSender
from shardnet.server.reaper import IdleReaper
from shardnet.server.request_rate import RequestRate
from shardnet.server.servicer import ServerRuntime, ShardServicer, add_to_server
from shardnet.server.sessions import SessionTable
from shardnet.server.tls import default_state_dir, server_certificate
from shardnet.version import __version__
from shardnet.wire import PROTOCOL_VERSION
from shardnet.wire.call_auth import CallSigner, CallVerifier, VerifyingInterceptor
from shardnet.wire.tls import fingerprint

logger = logging.getLogger(__name__)
_UNARY_WORKERS = 4  # gRPC worker threads beyond one per session, for Info and Forward
# The fit check before loading counts the span's weights plus the KV cache of one session of batch 1 and
# this many positions (fewer if --max-length or --max-cache-tokens is smaller): the least a server must
# hold to be of use. The rest of --max-cache-tokens is only warned about, not required.
MIN_CACHE_TOKENS = 2048


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def keepalive_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Ping silent connections so half-open ones (a client machine gone without a FIN) end their streams."""
    return [
        ("grpc.keepalive_time_ms", round(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(config.keepalive_timeout_s * 1000)),
        # grpc 1.85 waits this long for a keepalive ping's answer (measured: 60 s by default, whatever the above)
        ("grpc.http2.ping_timeout_ms", round(config.keepalive_timeout_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a session that sends nothing
        ("grpc.http2.min_ping_interval_without_data_ms", round(config.min_client_ping_interval_s * 1000)),
    ]


class Server:
    """One running server. ``run()`` returns after a clean shutdown (SIGTERM/SIGINT or ``stop()``)."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.device = resolve_device(config.device)  # ConfigError if this machine does not have it
        make_current(self.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_config = load_config(config.model_path)
        self.adapter = adapter_for(self.model_config)  # ModelLoadError naming the supported architectures
        num_blocks = block_count(self.model_config)
        if config.blocks is not None and config.blocks[1] > num_blocks:
            start, end = config.blocks
            raise ConfigError(
                f"--blocks {start}:{end} is outside the model: it has {num_blocks} blocks (0:{num_blocks})"
            )
        if config.num_blocks is not None and config.num_blocks > num_blocks:
            raise ConfigError(
                f"--num-blocks {config.num_blocks} is more than the model's {num_blocks} blocks"
            )
        self.num_blocks = num_blocks
        self.checkpoint = Checkpoint(config.model_path)  # fails early on a folder without safetensors
        check_quant_supported(config.quant, self.device)  # before loading anything
        self.model_id = validate_model_id(config.model_id or derive_model_id(self.model_config))
        max_position = int(getattr(self.model_config, "max_position_embeddings", config.max_length))
        self.max_length = min(config.max_length, max_position)
        self.max_position = max_position
        self._check_fit()
        self.tls: tuple[bytes, bytes] | None = None  # (certificate, key) PEM with TLS on
        if config.uses_tls:  # a missing or unsafe key file fails here, before anything loads
            self.tls = server_certificate(
                config.tls_cert, config.tls_key, config.state_dir or default_state_dir()
            )
        self.tls_fingerprint = fingerprint(self.tls[0]) if self.tls else ""
        self.runtime = ServerRuntime(
            SessionTable(
                config.max_cache_tokens,
                config.max_sessions,
                max_cache_tokens_per_client=config.client_cache_tokens,
                max_sessions_per_client=config.client_sessions,
            ),
            config.max_message_bytes,
            quant=config.quant,
            rate=RequestRate(config.max_requests_per_s, burst=2 * config.max_requests_per_s),
        )
        self._stop = asyncio.Event()

    def _check_fit(self) -> None:
        """Before anything starts: the span's weights plus one session's cache must fit on the device.

        With --num-blocks the span is chosen later, so the heaviest window of that many blocks is checked.
        """
        cfg = self.config
        if cfg.blocks is not None:  # only the span's shards need to be there
            span, flag = cfg.blocks, "--blocks"
            weights = sum(block_weight_bytes(self.checkpoint, *span, self.dtype))
        else:  # any span may be chosen: every shard must be there
            n, flag = cfg.num_blocks, "--num-blocks"
            per_block = block_weight_bytes(self.checkpoint, 0, self.num_blocks, self.dtype)
            start = max(range(self.num_blocks - n + 1), key=lambda s: sum(per_block[s : s + n]))
            span, weights = (start, start + n), sum(per_block[start : start + n])
        blocks = span[1] - span[0]
        cache_tokens = min(MIN_CACHE_TOKENS, self.max_length, cfg.max_cache_tokens)
        per_token = kv_bytes_per_token(self.model_config, blocks, self.dtype)
        footprint = SpanFootprint(span, weights, cache_tokens, cache_tokens * per_token)
        free = free_memory_bytes(self.device)
        check_fit(footprint, free, self.device, self.dtype, flag)
        budget = (cfg.max_cache_tokens + cfg.prefix_tokens) * per_token  # sessions and kept prefixes
        if footprint.weight_bytes + budget > free:
            logger.warning(
                "--max-cache-tokens %d and --prefix-cache-tokens %d need %.1f GiB of KV cache over %d blocks, "
                "but only %.1f GiB is free on %s after the weights: sessions may fail to allocate before the "
                "budget is used up",
                cfg.max_cache_tokens,
                cfg.prefix_tokens,
                budget / GIB,
                blocks,
                (free - footprint.weight_bytes) / GIB,
                self.device,
            )

    def stop(self) -> None:
        self._stop.set()

    @property
    def span(self) -> tuple[int, int]:
        """The span served (or being loaded); known once run() has placed it."""
        return self.lifecycle.span

    def _record(self) -> ServerRecord:
        return ServerRecord(
            state=self.runtime.state.value,
            peer_id=self.dht.peer_id.to_base58(),
            host=self.config.dial_host,
            port=self.config.dial_port(self.port),
            start=self.span[0],
            end=self.span[1],
            dtype=dtype_name(self.dtype),
            quant=self.config.quant,
            protocol=PROTOCOL_VERSION,
            version=__version__,
            throughput=self.runtime.backend.throughput.steps_per_s if self.runtime.backend else 0.0,
            cache_tokens_free=max(self.runtime.sessions.cache_tokens_free, 0),
            cache_tokens_total=self.runtime.sessions.max_cache_tokens,
            open_sessions=len(self.runtime.sessions),
            sessions_served=self.runtime.sessions.sessions_served,
            max_length=self.max_length,
            max_batch_size=self.config.max_batch_size,
            push=True,
            tls_fingerprint=self.tls_fingerprint,
            prefix_hits=self.runtime.backend.prefix.hits if self.runtime.backend else 0,
            prefix_tokens_reused=self.runtime.backend.prefix.tokens_reused if self.runtime.backend else 0,
            weight_digests=self.lifecycle.weight_digests,
            adapters=self.runtime.backend.adapter_names if self.runtime.backend else [],
        )

    def _holders(self) -> list[ServerView]:
        """Every server of this model in the DHT now, once per block it holds (a hand-off's candidates)."""
        return [view for views in lookup(self.dht, self.model_id, self.num_blocks) for view in views]

    def _announced_addresses(self) -> dict[str, str]:
        """host:port -> TLS fingerprint of every server of this model in the DHT: the only addresses this
        one pushes to, each over TLS pinned to its certificate if it announced one."""
        found = lookup(self.dht, self.model_id, self.num_blocks)
        return {view.address: view.record.tls_fingerprint for views in found for view in views}

    def _start_grpc(self) -> grpc.Server:
        cfg = self.config
        # A worker thread per open stream (sessions) plus a few for Info/Forward; RPCs beyond that are
        # refused with RESOURCE_EXHAUSTED instead of queueing behind idle streams.
        workers = cfg.max_sessions + _UNARY_WORKERS
        # A private swarm's server refuses every call without a member's credential (wire/call_auth.py).
        verifier = CallVerifier(cfg.swarm_key) if cfg.swarm_key else None
        server = grpc.server(
            ThreadPoolExecutor(workers, thread_name_prefix="grpc"),
            options=grpc_options(cfg.max_message_bytes) + keepalive_options(cfg),
            maximum_concurrent_rpcs=workers,
            interceptors=[VerifyingInterceptor(verifier)] if verifier else None,
        )
        add_to_server(ShardServicer(self.runtime), server)
        if self.tls is not None:
            certificate, key = self.tls
            credentials = grpc.ssl_server_credentials([(key, certificate)])
            self.port = server.add_secure_port(f"{cfg.host}:{cfg.port}", credentials)
        else:
            self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} (address in use or not local)")
        if verifier is not None:  # credentials name the address the caller dialed: the announced one
            verifier.set_addresses([f"{cfg.dial_host}:{cfg.dial_port(self.port)}"])
        server.start()
        return server

    async def run(self) -> None:
        cfg = self.config
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

        # The DHT first: hivemind forks its process, and a fork must not happen while gRPC's threads run.
        self.dht = await asyncio.to_thread(
            start_dht,
            cfg.initial_peers,
            cfg.dht_host,
            cfg.dht_port,
            False,
            self.model_id,
            self.num_blocks,
            swarm_key=cfg.swarm_key,
        )
        threads = ComputeThreads.for_server(cfg.torch_threads)  # all cores alone, one each when loaded
        self.compute = ComputeQueue(max_batch_rows=cfg.max_chunk_tokens, threads=threads)  # after the fork
        # The current GPU is per thread. (torch's thread count is not: run() set it for every thread.)
        await asyncio.to_thread(self.compute.run, partial(make_current, self.device))
        placement = first = None
        try:
            self._start_metrics()  # a thread: after the DHT's fork
            span = cfg.blocks
            if span is None:
                placement = self._placement()
                first = await asyncio.to_thread(placement.first_look)
                span = first.span
            signer = CallSigner(cfg.swarm_key) if cfg.swarm_key else None
            self.runtime.push = PushSender(
                self._announced_addresses, grpc_options(cfg.max_message_bytes), signer=signer
            )
            self.runtime.handoff = HandOff(
                self._holders,
                self.dht.peer_id.to_base58(),
                dtype_name(self.dtype),
                cfg.quant,
                grpc_options(cfg.max_message_bytes),
                signer,
            )
            server = self._start_grpc()
        except BaseException:
            self._stop_metrics()
            await asyncio.to_thread(self.dht.shutdown)
            raise
        trigger = LoadTrigger.for_limits(cfg.max_cache_tokens, cfg.max_sessions)
        announcer = Announcer(self.dht, self.model_id, self._record, cfg.announce_ttl_s, trigger)
        loader = SpanLoader(
            cfg,
            self.adapter,
            self.checkpoint,
            self.model_config,
            self.model_id,
            self.dtype,
            self.device,
            self.max_length,
            self.max_position,
            self.compute,
        )
        peer_id = self.dht.peer_id.to_base58()
        self.lifecycle = Lifecycle(cfg, self.runtime, announcer, loader, span, placement, peer_id, self._stop)
        self.runtime.sessions.on_change = announcer.load_changed
        reaper = IdleReaper(self.runtime.sessions, cfg.session_idle_timeout_s)
        try:
            await announcer.announce_now()  # JOINING, at once: a server choosing its blocks now sees ours
            if placement is not None:
                await self.lifecycle.settle(first)
            load_s, throughput = await self.lifecycle.go_online()
            announcer.start()
            reaper.start()
            maddrs = visible_maddrs(self.dht)
            logger.info(
                "shardnet server ready: model=%s blocks=%d:%d device=%s dtype=%s quant=%s grpc=%s:%d "
                "(listening on %s:%d) tls=%s swarm=%s dht=%s load=%.1fs throughput=%.1f steps/s",
                self.model_id,
                *self.span,
                describe_device(self.device),
                dtype_name(self.dtype),
                cfg.quant,
                cfg.dial_host,
                cfg.dial_port(self.port),
                cfg.host,
                self.port,
                f"sha256:{self.tls_fingerprint}" if self.tls_fingerprint else "off",
                "private" if cfg.swarm_key else "public",
                maddrs[0] if maddrs else "?",
                load_s,
                throughput,
            )
            self.lifecycle.start_watchers()
            await self._stop.wait()
            await self.lifecycle.stop_watchers()
            if self.runtime.state in (ServerState.ONLINE, ServerState.DRAINING):
                await self.lifecycle.drain()
        finally:
            await reaper.stop()
            await announcer.stop()
            self.runtime.state = ServerState.OFFLINE
            await announcer.announce_now()
            await asyncio.to_thread(server.stop(grace=1.0).wait)
            self.runtime.push.close()
            self._stop_metrics()
            await asyncio.to_thread(self.dht.shutdown)
            logger.info("shardnet server stopped: blocks=%d:%d", *self.span)

    def _start_metrics(self) -> None:
        """``/metrics`` for Prometheus, with --metrics-port: from JOINING on, so a scrape sees the load."""
        cfg = self.config
        if cfg.metrics_port is None:
            return
        metrics = ServerMetrics(self.runtime, self.model_id)
        try:
            metrics.serve(cfg.metrics_host, cfg.metrics_port)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {cfg.metrics_port}: cannot listen on {cfg.metrics_host} ({exc.strerror or exc})"
            ) from exc
        self.runtime.metrics = metrics
        self.compute.observe_batch = metrics.batch_ran

    def _stop_metrics(self) -> None:
        if self.runtime.metrics is not None:
            self.runtime.metrics.stop()

    def _placement(self) -> Placement:
        # Exact servers only until --quant lands; then this server's own quantization.
        peers = Peers(dtype=dtype_name(self.dtype), quant=self.config.quant, protocol=PROTOCOL_VERSION)
        return Placement(self.dht, self.model_id, self.num_blocks, self.config.num_blocks, peers)


def run_server(config: ServerConfig) -> None:
    """Build and run a server until it is stopped; ConfigError/ModelLoadError surface before it listens."""

    async def main() -> None:
        await Server(config).run()

    asyncio.run(main())
