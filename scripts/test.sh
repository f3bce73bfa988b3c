#!/usr/bin/env bash
# The test command (README): sets up if needed, then runs the whole suite on real local swarms.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/shardnet ] || ./scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
