"""No torch shared-memory manager next to every shardnet process: hivemind's futures share by fd.

hivemind's futures (``MPFuture``, one per DHT call) keep their state in a byte of torch shared memory.
At import, hivemind sets torch's sharing strategy to ``file_system`` unless
``HIVEMIND_MEMORY_SHARING_STRATEGY`` names another, and with ``file_system`` the first such byte
starts ``torch_shm_manager``, a helper process of its own: 68 MiB of PSS next to every server, client
and DHT node (measured on a server of the mid benchmark model, 2026-11-22). ``file_descriptor``, torch's
own default on Linux, passes the memory's file descriptor instead and needs no helper. A DHT call then
costs about 0.8 ms more (1.1 vs 1.9 ms for a local store or get), which nothing on a decode path pays.

hivemind reads the variable once, when it is imported: ``prefer_fd_sharing`` must run before that.
The ``shardnet`` command does it first thing, so servers, DHT nodes, the gateway and the servers a
launcher starts all get it. A value already in the environment is kept; importing the ``shardnet``
library configures nothing.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)
STRATEGY_ENV = "HIVEMIND_MEMORY_SHARING_STRATEGY"
FD_SHARING = "file_descriptor"


def prefer_fd_sharing() -> None:
    """Ask hivemind (if not imported yet) and child processes to share futures' memory by file descriptor,
    unless the environment already names a strategy."""
    if STRATEGY_ENV in os.environ:
        return
    os.environ[STRATEGY_ENV] = FD_SHARING
    if "hivemind" in sys.modules:
        logger.debug(
            "hivemind is already loaded: %s=%s reaches only child processes", STRATEGY_ENV, FD_SHARING
        )
