"""Device and dtype names as flags and arguments spell them, checked for form only (no torch here, so a
command line with a bad value is refused at once). ``shardnet.devices`` resolves them on this machine."""

from __future__ import annotations

import re

from shardnet.errors import ConfigError

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # what a span computes in, and announces
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(?::\d+)?")


def named(flag: str, value: str) -> str:
    """How a user wrote a setting: '--device cuda' on the command line, "device='cuda'" in Python."""
    return f"{flag} {value}" if flag.startswith("--") else f"{flag}={value!r}"


def parse_device(text: str, flag: str = "--device") -> str:
    """Check the form of a device name ('CUDA:1 ' -> 'cuda:1'); whether this machine has it is
    decided by ``shardnet.devices.resolve_device``."""
    name = (str(text) if text is not None else "").strip().lower()
    if not _DEVICE.fullmatch(name):
        raise ConfigError(f"{named(flag, text)} is not a device: use {DEVICE_FORMS}")
    return name
