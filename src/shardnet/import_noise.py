"""Warnings some libraries log while they import, about optional kernels this use does not need: quiet them.

transformers imports torchao whenever it is installed (the ``quant`` extra), and torchao logs that a
CPU-only torch cannot load its CUDA extensions, while torch logs a deprecation about torchao's type
registrations; bitsandbytes logs about a kernel package from the Hugging Face hub. None of it is the
user's concern, so these loggers are held at ERROR while such an import runs, then restored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

IMPORT_NOISE = ("torchao", "bitsandbytes.backends.cpu.ops", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
