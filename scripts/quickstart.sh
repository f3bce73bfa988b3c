#!/usr/bin/env bash
# The main job on a fresh machine: set up, start a local swarm of 2 servers on a tiny random Llama,
# generate through it, check the tokens against local transformers, and stop the swarm.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/shardnet ] || ./scripts/setup.sh
. .venv/bin/activate
python servers/local_swarm.py --tiny --servers "${SERVERS:-2}" --check
