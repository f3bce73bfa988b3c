#!/usr/bin/env bash
# One full benchmark run on an otherwise idle machine: JSON lines and PNGs into OUT (default benchmarks/results/latest).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/latest}"
mkdir -p "$OUT"
. .venv/bin/activate
export HF_HUB_OFFLINE=1
for model in smollm2 tiny mid; do
    python benchmarks/hops.py --model "$model" --servers 1 2 3 6 --new-tokens 64 --repeats 3 \
        --plot "$OUT/hops_$model.png" > "$OUT/hops_$model.jsonl"
done
python benchmarks/forward.py --model smollm2 --servers 2 --shapes 1x512 8x128 --repeats 3 \
    --plot "$OUT/forward_smollm2.png" > "$OUT/forward_smollm2.jsonl"
python benchmarks/memory.py spans --model mid --spans 0:1 0:2 0:4 0:8 0:16 \
    --plot "$OUT/memory_mid.png" > "$OUT/memory.jsonl"
python benchmarks/memory.py 13b --blocks 0:4 --steps 16 >> "$OUT/memory.jsonl"
