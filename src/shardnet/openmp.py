"""A short OpenMP spin for every shardnet process: they take turns on cores they may share.

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

GNU OpenMP reads the setting once, when torch loads it: ``prefer_short_spin`` must run before torch is
imported. The ``shardnet`` command does it first thing, so servers, the demo, ``chat`` and ``api`` get
it, and so do the servers a launcher starts. A value already in the environment is kept.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)
SPIN_ENV = "GOMP_SPINCOUNT"
SHORT_SPIN = "30000"  # spin rounds of an idle OpenMP worker before it sleeps (GNU OpenMP's default: 300000)


def prefer_short_spin() -> None:
    """Ask for the short spin in this process (if torch is not loaded yet) and in its children, unless
    the environment already says how long to spin."""
    if SPIN_ENV in os.environ:
        return
    os.environ[SPIN_ENV] = SHORT_SPIN
    if "torch" in sys.modules:
        logger.debug("torch is already loaded: %s=%s reaches only child processes", SPIN_ENV, SHORT_SPIN)
