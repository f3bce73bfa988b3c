"""Imported by harness before torch: benchmark processes (local transformers and the swarm client) get
the same short OpenMP spin as every ``shardnet`` process (see shardnet/openmp.py), so a client waiting
for its servers does not spin on their cores, and local and swarm are measured under one setting; and
the same fd sharing of hivemind's futures (shardnet/shm_sharing.py), so memory is measured as a
``shardnet`` process has it."""

from shardnet.openmp import prefer_short_spin
from shardnet.shm_sharing import prefer_fd_sharing

prefer_short_spin()
prefer_fd_sharing()
