"""ServerConfig: every knob of ``shardnet serve``, validated where it is made."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shardnet.device_names import DTYPE_NAMES, parse_device
from shardnet.errors import ConfigError
from shardnet.swarm_key import SwarmKey

HEADROOM_ON = 0.5  # --headroom-on default
HEADROOM_OFF = 0.2  # --headroom-off default
HEADROOM_WINDOW_S = 60.0  # --headroom-window default
PREFIX_SHARE = 8  # by default, kept prompt prefixes hold an eighth of --max-cache-tokens

DTYPE_CHOICES = ("auto", *DTYPE_NAMES)  # --dtype: auto = by device (see shardnet/devices.py)
QUANT_NAMES = ("none", "int8", "nf4")  # = shardnet.models.quantization.QUANT_MODES, without importing torch


def parse_span(text: str) -> tuple[int, int]:
    """'10:20' -> (10, 20): half-open, non-empty, non-negative."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not match:
        raise ConfigError(f"{text!r} is not a span START:END (half-open, e.g. 0:12)")
    start, end = int(match.group(1)), int(match.group(2))
    if end <= start:
        raise ConfigError(f"{text!r} is empty: END must be greater than START (spans are half-open)")
    return start, end


@dataclass(frozen=True)
class ServerConfig:
    model_path: Path  # folder saved by transformers' save_pretrained (safetensors)
    blocks: tuple[int, int] | None = None  # span served, half-open; None = chosen at start (num_blocks)
    num_blocks: int | None = None  # serve this many blocks where the swarm is weakest (instead of blocks)
    initial_peers: tuple[str, ...] = ()  # multiaddrs of DHT peers to join; empty = start a new swarm
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps; auto = the first CUDA GPU, else the CPU
    dtype: str = "auto"  # compute dtype of the blocks; auto = bfloat16/float16 on a GPU, float32 on the CPU
    quant: str = "none"  # weight-only quantization of the blocks' linear layers: none, int8 or nf4
    host: str = "127.0.0.1"  # interface the gRPC server listens on
    port: int = 0  # gRPC port; 0 = pick a free one
    announce_host: str | None = None  # host clients dial; default = host
    announce_port: int | None = None  # gRPC port clients dial (forwarded, proxied); default = port
    dht_host: str = "127.0.0.1"  # interface the DHT node listens on
    dht_port: int = 0  # DHT port; 0 = pick a free one
    model_id: str | None = None  # DHT prefix; default = derived from the model's config
    max_batch_size: int = 32  # largest batch per request or session
    max_length: int = 8192  # longest session, positions (capped by the model's max_position_embeddings)
    max_cache_tokens: int = 131072  # KV-cache budget over all sessions, batch x positions
    max_sessions: int = 64  # inference sessions open at once
    # Per client (one connection): a share of those, so one client cannot take all of a server's cache.
    max_cache_tokens_per_client: int | None = None  # None = half of max_cache_tokens
    max_sessions_per_client: int | None = None  # None = half of max_sessions
    max_requests_per_s: float = 100.0  # Info, Forward and session opens per client; bursts of twice that
    max_message_bytes: int = 256 * 1024 * 1024  # largest gRPC message sent or received, bytes
    announce_ttl_s: float = 30.0  # DHT record lifetime; refreshed every third of it
    drain_timeout_s: float = 10.0  # on SIGTERM, how long open sessions may finish before the server stops
    torch_threads: int | None = (
        None  # torch intra-op threads; None = chosen by the server from probe and load
    )
    session_idle_timeout_s: float = 300.0  # a session with no step for this long is closed, its cache freed
    max_chunk_tokens: int = 1024  # largest compute chunk, batch x positions; other steps run between chunks
    batching: bool = True  # concurrent sessions' decode steps share one forward pass (max_chunk_tokens rows)
    prefix_cache_tokens: int | None = None  # kept prompt prefixes, batch x positions; None = an eighth of
    # max_cache_tokens, 0 = none (server/prefix_reuse.py)
    share_prefix_cache: bool = False  # reuse one client's prefixes for another (a timing side channel)
    adapters: tuple[Path, ...] = ()  # PEFT LoRA folders served besides the base model (server/adapters.py)
    swarm_key: SwarmKey | None = None  # a private swarm's key: sealed DHT records, signed gRPC calls
    tls: bool = False  # gRPC over TLS with a self-signed certificate kept in state_dir (or tls_cert/tls_key)
    tls_cert: Path | None = None  # PEM certificate for gRPC TLS (with tls_key; implies tls)
    tls_key: Path | None = None  # its PEM private key, readable by its owner only
    state_dir: Path | None = None  # where a server keeps its state (the made TLS certificate); None = default
    # gRPC keepalive, so a half-open connection (client machine gone without a FIN) ends its sessions: the
    # server pings each connection with open streams every keepalive_time_s, also when no data flows, and
    # drops it when an answer takes longer than keepalive_timeout_s. With 60 s + 20 s, a vanished client's
    # session is freed within ~80 s, long before the idle timeout (tests/test_pressure.py checks 1 s + 1 s).
    keepalive_time_s: float = 60.0  # seconds between the server's pings of a connection
    keepalive_timeout_s: float = 20.0  # seconds a ping's answer may take before the connection is dropped
    min_client_ping_interval_s: float = 10.0  # clients may ping this often; more often gets a GOAWAY
    # Headroom policy (server/headroom.py): rest below headroom_off, serve again above headroom_on.
    headroom_file: Path | None = None  # a number in [0, 1] the owner's adapter rewrites; None = policy off
    headroom_on: float | None = None  # resume when the rolling mean rises above this; None = HEADROOM_ON
    headroom_off: float | None = None  # rest when it falls below this; None = HEADROOM_OFF
    headroom_window_s: float | None = None  # rolling mean over this many seconds; None = HEADROOM_WINDOW_S
    rebalance_period_s: float = (
        60.0  # a --num-blocks server checks about this often whether to move; 0 = never
    )
    metrics_port: int | None = (
        None  # Prometheus /metrics on this port (server/metrics.py); None = off, 0 = any
    )
    metrics_host: str = "127.0.0.1"  # interface /metrics listens on

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        parse_device(self.device)
        if self.quant not in QUANT_NAMES:
            raise ConfigError(f"--quant {self.quant!r} is not one of {', '.join(QUANT_NAMES)}")
        for folder in self.adapters:  # before anything starts; the weights load with the span
            for needed in ("adapter_config.json", "adapter_model.safetensors"):
                if not (Path(folder) / needed).is_file():
                    raise ConfigError(
                        f"--adapters {folder}: no {needed} there (a PEFT LoRA folder, safetensors)"
                    )
        if self.adapters and self.quant != "none":
            raise ConfigError("--adapters needs exact weights: serve them with --quant none")
        if self.blocks is None and self.num_blocks is None:
            raise ConfigError(
                "choose what to serve: --num-blocks N (the N blocks the swarm needs most) "
                "or --blocks START:END (a span you pick)"
            )
        if self.blocks is not None and self.num_blocks is not None:
            raise ConfigError("--blocks and --num-blocks exclude each other: pass one")
        if self.blocks is not None:
            start, end = self.blocks
            if start < 0 or end <= start:
                raise ConfigError(f"--blocks {start}:{end} is not a non-empty half-open span")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError("--num-blocks must be at least 1")
        if not 0 <= self.port <= 65535 or not 0 <= self.dht_port <= 65535:
            raise ConfigError("--port and --dht-port must be between 0 and 65535")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(
                f"--metrics-port {self.metrics_port} is not a port: it must be between 0 and 65535"
            )
        if self.announce_port is not None and not 1 <= self.announce_port <= 65535:
            raise ConfigError(
                f"--announce-port {self.announce_port} is not a port: it must be between 1 and 65535"
            )
        if self.host in ("0.0.0.0", "::") and not self.announce_host:
            raise ConfigError(
                f"--host {self.host} listens everywhere: also pass --announce-host, the address clients dial"
            )
        for name in (
            "max_batch_size",
            "max_length",
            "max_cache_tokens",
            "max_sessions",
            "max_message_bytes",
            "max_chunk_tokens",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.announce_ttl_s <= 0 or self.drain_timeout_s < 0:
            raise ConfigError("--announce-ttl must be positive and --drain-timeout non-negative")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError("--torch-threads must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "--tls-cert and --tls-key go together: pass both (or --tls for a made certificate)"
            )
        for name in ("max_cache_tokens_per_client", "max_sessions_per_client"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.prefix_cache_tokens is not None and self.prefix_cache_tokens < 0:
            raise ConfigError("--prefix-cache-tokens must be 0 (off) or more")
        if not self.max_requests_per_s > 0:
            raise ConfigError("--max-requests-per-s must be positive")
        if not self.session_idle_timeout_s > 0:
            raise ConfigError("--session-idle-timeout must be positive (seconds)")
        if min(self.keepalive_time_s, self.keepalive_timeout_s, self.min_client_ping_interval_s) <= 0:
            raise ConfigError(
                "keepalive_time_s, keepalive_timeout_s and min_client_ping_interval_s must be positive"
            )

        self._check_policies()

    def _check_policies(self) -> None:
        knobs = {"--headroom-on": self.headroom_on, "--headroom-off": self.headroom_off}
        knobs["--headroom-window"] = self.headroom_window_s
        given = [flag for flag, value in knobs.items() if value is not None]
        if given and self.headroom_file is None:
            raise ConfigError(f"{' and '.join(given)} need --headroom-file, the file they apply to")
        for flag in ("--headroom-on", "--headroom-off"):
            value = knobs[flag]
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{flag} {value:g} is not in [0, 1] (the headroom file's range)")
        on, off, window_s = self.headroom
        if not on > off:
            raise ConfigError(
                f"--headroom-on ({on:g}) must be greater than --headroom-off ({off:g}): between the two "
                "nothing changes, so the server does not flap"
            )
        if not window_s > 0:
            raise ConfigError(f"--headroom-window {window_s:g} must be positive (seconds)")
        if not self.rebalance_period_s >= 0:
            raise ConfigError("--rebalance-period must be 0 (never move) or a positive number of seconds")

    @property
    def headroom(self) -> tuple[float, float, float]:
        """(on, off, window_s) of the headroom policy, defaults filled in."""
        on = HEADROOM_ON if self.headroom_on is None else self.headroom_on
        off = HEADROOM_OFF if self.headroom_off is None else self.headroom_off
        window_s = HEADROOM_WINDOW_S if self.headroom_window_s is None else self.headroom_window_s
        return on, off, window_s

    @property
    def rebalances(self) -> bool:
        """A --num-blocks server with a period moves to the swarm's weakest blocks; --blocks never moves."""
        return self.num_blocks is not None and self.rebalance_period_s > 0

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_cert is not None

    @property
    def prefix_tokens(self) -> int:
        if self.prefix_cache_tokens is not None:
            return self.prefix_cache_tokens
        return self.max_cache_tokens // PREFIX_SHARE

    @property
    def client_cache_tokens(self) -> int:
        return self.max_cache_tokens_per_client or max(1, self.max_cache_tokens // 2)

    @property
    def client_sessions(self) -> int:
        return self.max_sessions_per_client or max(1, self.max_sessions // 2)

    @property
    def dial_host(self) -> str:
        return self.announce_host or self.host

    def dial_port(self, listening_port: int) -> int:
        """The gRPC port clients dial: --announce-port, else the one we listen on (known once we do)."""
        return self.announce_port or listening_port
