"""Imported by harness before torch: benchmark processes (local transformers and the swarm client) get
the environment defaults of every ``shardnet`` process (see shardnet/process_env.py): the short OpenMP
spin, so a client waiting for its servers does not spin on their cores and local and swarm are measured
under one setting, and hivemind's fd sharing, so memory is measured as a ``shardnet`` process has it."""

from shardnet.process_env import apply_defaults

apply_defaults()
