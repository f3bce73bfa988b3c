"""ClientConfig: every knob of ``ShardedModel.from_pretrained`` that is not the model itself."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from shardnet.device_names import parse_device
from shardnet.errors import ConfigError

WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANT_MODES = ("none", "int8", "nf4")
ADAPTER_NAME = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
)  # as the DHT record's schema allows  # weight-only quantization a server may announce


@dataclass(frozen=True)
class ClientConfig:
    dtype: torch.dtype = torch.float32  # dtype of the local parts and of the activations sent
    device: str = "cpu"  # where the local parts compute: auto | cpu | cuda | cuda:N | mps
    route_timeout_s: float = 30.0  # how long to wait for usable servers covering the blocks needed
    request_timeout_s: float = 120.0  # a server that does not answer one step or forward in time has failed
    hedge_floor_s: float = 3.0  # a step is never hedged sooner (see client/failover.py: its budget)
    max_retries: int = 3  # failovers allowed for one step (or one forward) before its error is raised
    refresh_interval_s: float = 10.0  # how often the swarm view is refreshed in the background
    max_message_bytes: int = 256 * 1024 * 1024  # largest gRPC message sent or received, bytes
    allowed_servers: frozenset[str] | None = None  # if set, only these peer ids are routed to
    blocked_servers: frozenset[str] = frozenset()  # peer ids never routed to
    quant: frozenset[str] = frozenset({"none"})  # quantizations of servers routed through (none = exact)
    push: bool = True  # servers pass each step's output on to the next server (when all of a route can)
    verify_fraction: float = 0.05  # probability that a hop's step is checked by other holders (0 = never)
    active_adapter: str | None = None  # a LoRA adapter servers announced; only they are used (None: base)

    def __post_init__(self) -> None:
        if self.dtype not in WIRE_DTYPES:
            raise ConfigError(
                f"dtype {self.dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16"
            )
        object.__setattr__(self, "device", parse_device(self.device, flag="device"))
        for name in ("route_timeout_s", "request_timeout_s", "refresh_interval_s", "hedge_floor_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.active_adapter is not None and not ADAPTER_NAME.match(str(self.active_adapter)):
            raise ConfigError(
                f"active_adapter must name an adapter (letters, digits, '_', '.', '-'), got {self.active_adapter!r}"
            )
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ConfigError(f"verify_fraction must be in [0, 1], got {self.verify_fraction!r}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be 0 or more, got {self.max_retries!r}")
        unknown = set(self.quant) - set(QUANT_MODES)
        if not self.quant or unknown:
            raise ConfigError(
                f"quant must name some of {', '.join(QUANT_MODES)} (or 'any'), got {sorted(self.quant)}"
            )
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be at least 1024, got {self.max_message_bytes!r}")

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def peer_set(peers: Iterable[str] | str | None, name: str) -> frozenset[str] | None:
    """allowed_servers / blocked_servers as given by a user: an iterable of peer ids, not one string."""
    if peers is None:
        return None
    if isinstance(peers, str):
        raise ConfigError(f"{name} takes a list of peer ids, not one string: [{peers!r}]")
    return frozenset(str(peer) for peer in peers)


def quant_set(quant: str | Iterable[str]) -> frozenset[str]:
    """``quant=`` as given by a user: one mode, several, or "any"."""
    if isinstance(quant, str):
        return frozenset(QUANT_MODES) if quant == "any" else frozenset({quant})
    return frozenset(str(mode) for mode in quant)
