#!/usr/bin/env bash
# Wheels that benchmarks/gpu.py needs on a GPU machine with no package index (the accelerator lent to
# some sessions: Python 3.12, torch 2.11+cu130, transformers 5.17, no hivemind), at requirements.lock's
# versions, for CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored). README "GPU figures" says how
# they travel and are installed there. Packages that machine already has at a version we support
# (torch, numpy, scipy, msgpack, psutil, safetensors, accelerate, uvloop, ...) are not fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements.lock
PACKAGES=(
    # shardnet's own needs there: transformers within pyproject's range, the stubs' grpcio and protobuf
    transformers huggingface-hub tokenizers hf-xet grpcio protobuf platformdirs tqdm
    # hivemind and what it imports that the machine lacks
    hivemind base58 configargparse cryptography cffi pycparser netaddr prefetch-generator varint
    py-multihash py-cid py-multibase py-multicodec morphys python-baseconv mmh3 six sortedcontainers
    pydantic pydantic-core annotated-types typing-inspection typing-extensions
)
pins=()
for name in "${PACKAGES[@]}"; do
    pin=$(grep -iE "^${name}==" "$LOCK") || { echo "$name is not in $LOCK" >&2; exit 1; }
    pins+=("$pin")
done
rm -rf .whl && mkdir .whl
for pin in "${pins[@]}"; do
    # A wheel for that machine; a package published as source only is pure Python: built into one here.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pin" 2>/dev/null \
        || python3 -m pip wheel -q --no-deps -w .whl "$pin" 2>/dev/null \
        || { echo "no wheel for $pin" >&2; exit 1; }
done
du -sh .whl
