"""Where model parts run: device names resolved against this machine, and the dtype ``auto`` picks.

Servers use it for ``--device`` / ``--dtype``, the client for ``from_pretrained(device=...)``. ``auto`` picks
the first CUDA GPU if there is one, else the CPU (``mps`` is only used when asked for). ``--dtype auto``
picks bfloat16 on a CUDA GPU that computes it natively (compute capability 8.0+, or any ROCm GPU),
float16 on older GPUs and on MPS, float32 on the CPU; an explicit dtype always wins.
"""

from __future__ import annotations

import psutil
import torch

from shardnet.device_names import DTYPE_NAMES, parse_device
from shardnet.device_names import named as _named
from shardnet.errors import ConfigError

__all__ = ["DTYPE_NAMES", "HOST", "parse_device"]  # and the functions below
HOST = torch.device("cpu")  # where token ids, masks and tensors for and from the wire live


def resolve_device(name: str | torch.device, flag: str = "--device") -> torch.device:
    """The torch device a device name means here; ConfigError if this machine does not have it."""
    name = parse_device(str(name), flag)
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(
                f"{_named(flag, name)}: MPS is not available on this machine (it needs Apple silicon and a torch "
                f"built with MPS); use {_named(flag, 'cpu')} or auto"
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        built = (
            "" if torch.version.cuda or torch.version.hip else f", and torch {torch.__version__} has no CUDA"
        )
        raise ConfigError(
            f"{_named(flag, name)}: CUDA is not available on this machine (no usable GPU{built}); "
            f"use {_named(flag, 'cpu')} or auto"
        )
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"{_named(flag, name)}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
            f"(cuda:0 to cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def make_current(device: torch.device) -> None:
    """Make a CUDA device this process's current one, so that nothing (a library allocating on the
    default device, a CUDA context) lands on cuda:0 when the span is on cuda:N."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``--dtype name`` on ``device``: an explicit name wins, ``auto`` picks."""
    if name != "auto":
        if name not in DTYPE_NAMES:
            raise ConfigError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
        return getattr(torch, name)
    if device.type == "cuda":
        native_bf16 = bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8
        return torch.bfloat16 if native_bf16 else torch.float16
    if device.type == "mps":
        return torch.float16  # bfloat16 on MPS depends on the macOS version, and torch cannot tell
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_device(device: torch.device) -> str:
    """The device for logs: 'cuda:0 (NVIDIA H100 80GB HBM3)', 'cpu'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def free_memory_bytes(device: torch.device) -> int:
    """Memory a span may still take on ``device``: free GPU memory for CUDA, the recommended working
    set minus what Metal holds for MPS, available RAM for the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        return max(int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()), 0)
    return int(psutil.virtual_memory().available)
