#!/usr/bin/env bash
# The test command (README): sets up if needed, then runs the whole suite on real local swarms.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/shardnet ] || ./scripts/setup.sh
. .venv/bin/activate
# Two workers (pytest-xdist), each taking whole test files (module fixtures start a swarm once): most of a
# test's time is processes starting and waiting on each other, so two files at once fit on two cores.
python -m pytest -q -n 2 --dist loadfile "$@"
