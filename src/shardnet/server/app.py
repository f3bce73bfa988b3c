"""Composition root of a server: load the span, start gRPC and the DHT, announce, drain on a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from shardnet.dht import ServerRecord, ServerState, start_dht, visible_maddrs
from shardnet.errors import ConfigError
from shardnet.models import Checkpoint, adapter_for, derive_model_id, load_config, validate_model_id
from shardnet.models.quantization import check_quant_supported, quantize_span
from shardnet.server.announcer import Announcer, LoadTrigger
from shardnet.server.backend import SpanBackend, SpanLimits
from shardnet.server.config import ServerConfig
from shardnet.server.reaper import IdleReaper
from shardnet.server.servicer import ServerRuntime, ShardServicer
from shardnet.server.sessions import SessionTable
from shardnet.version import __version__
from shardnet.wire import PROTOCOL_VERSION, pb_grpc

logger = logging.getLogger(__name__)
_UNARY_WORKERS = 4  # gRPC worker threads beyond one per session, for Info and Forward


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
        self.model_config = load_config(config.model_path)
        self.adapter = adapter_for(self.model_config)
        num_blocks = self.adapter.num_blocks(self.model_config)
        if config.end > num_blocks:
            raise ConfigError(
                f"--blocks {config.start}:{config.end} is outside the model: it has {num_blocks} blocks (0:{num_blocks})"
            )
        self.num_blocks = num_blocks
        self.checkpoint = Checkpoint(config.model_path)  # fails early on a folder without safetensors
        check_quant_supported(config.quant, torch.device("cpu"))  # before loading; spans load on the CPU
        self.model_id = validate_model_id(config.model_id or derive_model_id(self.model_config))
        max_position = int(getattr(self.model_config, "max_position_embeddings", config.max_length))
        self.max_length = min(config.max_length, max_position)
        self.max_position = max_position
        self.runtime = ServerRuntime(
            SessionTable(config.max_cache_tokens, config.max_sessions),
            config.max_message_bytes,
            quant=config.quant,
        )
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def _record(self) -> ServerRecord:
        return ServerRecord(
            state=self.runtime.state.value,
            peer_id=self.dht.peer_id.to_base58(),
            host=self.config.dial_host,
            port=self.port,
            start=self.config.start,
            end=self.config.end,
            dtype=self.config.dtype,
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
        )

    def _load_backend(self) -> SpanBackend:
        dtype = getattr(torch, self.config.dtype)
        span = self.adapter.load_span(
            self.checkpoint, self.model_config, self.config.start, self.config.end, dtype
        )
        # Right after loading, layer by layer: the peak is the span in --dtype, never the whole model.
        quantize_span(span, self.config.quant, next(span.parameters()).device)
        limits = SpanLimits(
            model_id=self.model_id,
            start=self.config.start,
            end=self.config.end,
            hidden_size=int(self.model_config.hidden_size),
            max_batch_size=self.config.max_batch_size,
            max_length=self.max_length,
            max_position=self.max_position,
        )
        return SpanBackend(span, dtype, limits, self.config.max_chunk_tokens)

    def _start_grpc(self) -> grpc.Server:
        cfg = self.config
        # A worker thread per open stream (sessions) plus a few for Info/Forward; RPCs beyond that are
        # refused with RESOURCE_EXHAUSTED instead of queueing behind idle streams.
        workers = cfg.max_sessions + _UNARY_WORKERS
        server = grpc.server(
            ThreadPoolExecutor(workers, thread_name_prefix="grpc"),
            options=grpc_options(cfg.max_message_bytes) + keepalive_options(cfg),
            maximum_concurrent_rpcs=workers,
        )
        pb_grpc.add_ShardServicer_to_server(ShardServicer(self.runtime), server)
        self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} (address in use or not local)")
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
            start_dht, cfg.initial_peers, cfg.dht_host, cfg.dht_port, False, self.model_id, self.num_blocks
        )
        try:
            server = self._start_grpc()
        except BaseException:
            await asyncio.to_thread(self.dht.shutdown)
            raise
        trigger = LoadTrigger.for_limits(cfg.max_cache_tokens, cfg.max_sessions)
        announcer = Announcer(self.dht, self.model_id, self._record, cfg.announce_ttl_s, trigger)
        self.runtime.sessions.on_change = announcer.load_changed
        reaper = IdleReaper(self.runtime.sessions, cfg.session_idle_timeout_s)
        try:
            await announcer.announce_now()  # JOINING
            began = time.perf_counter()
            self.runtime.backend = await asyncio.to_thread(self._load_backend)
            throughput = await asyncio.to_thread(self.runtime.backend.probe_throughput)
            self.runtime.state = ServerState.ONLINE
            await announcer.announce_now()
            announcer.start()
            reaper.start()
            maddrs = visible_maddrs(self.dht)
            logger.info(
                "shardnet server ready: model=%s blocks=%d:%d dtype=%s quant=%s grpc=%s:%d dht=%s load=%.1fs throughput=%.1f steps/s",
                self.model_id,
                cfg.start,
                cfg.end,
                cfg.dtype,
                cfg.quant,
                cfg.dial_host,
                self.port,
                maddrs[0] if maddrs else "?",
                time.perf_counter() - began,
                throughput,
            )
            await self._stop.wait()
            await self._drain(announcer)
        finally:
            await reaper.stop()
            await announcer.stop()
            self.runtime.state = ServerState.OFFLINE
            await announcer.announce_now()
            await asyncio.to_thread(server.stop(grace=1.0).wait)
            await asyncio.to_thread(self.dht.shutdown)
            logger.info("shardnet server stopped: blocks=%d:%d", cfg.start, cfg.end)

    async def _drain(self, announcer: Announcer) -> None:
        """Refuse new work, tell the DHT, and give open sessions up to drain_timeout_s to finish."""
        self.runtime.state = ServerState.DRAINING
        await announcer.announce_now()
        deadline = time.monotonic() + self.config.drain_timeout_s
        if len(self.runtime.sessions):
            logger.info(
                "draining: %d open sessions, up to %.0fs",
                len(self.runtime.sessions),
                self.config.drain_timeout_s,
            )
        while len(self.runtime.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


def run_server(config: ServerConfig) -> None:
    """Build and run a server until it is stopped; ConfigError/ModelLoadError surface before it listens."""

    async def main() -> None:
        await Server(config).run()

    asyncio.run(main())
