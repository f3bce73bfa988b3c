"""Environment defaults every shardnet process sets before torch and hivemind load.

Both settings are read once, when the library loads, so ``apply_defaults`` must run before that. The
``shardnet`` command calls it first thing, so servers, DHT nodes, the demo, ``chat``, ``api`` and the
servers a launcher starts all get them; the benchmarks do the same (``benchmarks/process_env.py``). A
value already in the environment is kept, and importing the ``shardnet`` library configures nothing.

**A short OpenMP spin** (``GOMP_SPINCOUNT=30000``): processes take turns on cores they may share.
torch computes with GNU OpenMP. When a parallel region ends, its idle worker threads spin for a while
(300,000 rounds by default, several milliseconds) before they sleep, so the next region of the same
process starts at once. Between the regions of one forward pass that is right. But a client waits
while its servers compute, and the servers of a chain wait for each other: on a machine they share
(a local swarm, the demo, a benchmark, a volunteer running a client next to a server) each one's
workers keep spinning on the cores the next one needs. Measured on 2 cores with the mid benchmark model
(benchmarks/hops.py, one run per setting): with ``GOMP_SPINCOUNT=30000`` a 1-server swarm decoded at
0.93x local transformers instead of 0.80x, and a 3-server swarm at 0.76x instead of 0.59x, while a
lone process's decode step stayed within 2% of the default. ``OMP_WAIT_POLICY=PASSIVE`` (no spin at
all) costs a lone process ~30% and was no better for the swarm.

**hivemind's futures share memory by file descriptor**
(``HIVEMIND_MEMORY_SHARING_STRATEGY=file_descriptor``), so no torch shared-memory manager runs next to
every process. hivemind's futures (``MPFuture``, one per DHT call) keep their state in a byte of torch shared memory.
At import, hivemind sets torch's sharing strategy to ``file_system`` unless
``HIVEMIND_MEMORY_SHARING_STRATEGY`` names another, and with ``file_system`` the first such byte
starts ``torch_shm_manager``, a helper process of its own: 68 MiB of PSS next to every server, client
and DHT node (measured on a server of the mid benchmark model, 2026-11-22). ``file_descriptor``, torch's
own default on Linux, passes the memory's file descriptor instead and needs no helper. A DHT call then
costs about 0.8 ms more (1.1 vs 1.9 ms for a local store or get), which nothing on a decode path pays.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)
DEFAULTS = {
    # (value, the module that reads it at import)
    "GOMP_SPINCOUNT": ("30000", "torch"),  # spin rounds of an idle OpenMP worker (GNU's default: 300000)
    "HIVEMIND_MEMORY_SHARING_STRATEGY": ("file_descriptor", "hivemind"),
}


def apply_defaults() -> None:
    """Set each default in this process's environment (reaching children too), unless already set."""
    for name, (value, reader) in DEFAULTS.items():
        if name in os.environ:
            continue
        os.environ[name] = value
        if reader in sys.modules:
            logger.debug("%s is already loaded: %s=%s reaches only child processes", reader, name, value)
