#!/usr/bin/env bash
# One full benchmark run on an otherwise idle machine: JSON lines and PNGs into OUT (default benchmarks/results/latest).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/latest}"
mkdir -p "$OUT"
. .venv/bin/activate
export HF_HUB_OFFLINE=1
# Threads: torch's default (all cores) for local transformers and for every server, since the servers
# of a chain compute one after the other. The tiny model's blocks are too small for a second thread to
# pay (it measured slower, local and swarm alike), so it runs with 1 thread everywhere.
for model in smollm2 mid; do
    python benchmarks/hops.py --model "$model" --servers 1 2 3 6 --new-tokens 64 --repeats 3 \
        --plot "$OUT/hops_$model.png" > "$OUT/hops_$model.jsonl"
done
python benchmarks/hops.py --model tiny --servers 1 2 3 6 --new-tokens 64 --repeats 3 \
    --client-threads 1 --server-threads 1 --plot "$OUT/hops_tiny.png" > "$OUT/hops_tiny.jsonl"
python benchmarks/forward.py --model smollm2 --servers 2 --shapes 1x512 8x128 --repeats 3 \
    --plot "$OUT/forward_smollm2.png" > "$OUT/forward_smollm2.jsonl"
python benchmarks/memory.py spans --model mid --spans 0:1 0:2 0:4 0:8 0:16 \
    --plot "$OUT/memory_mid.png" > "$OUT/memory.jsonl"
python benchmarks/memory.py 13b --blocks 0:4 --steps 16 >> "$OUT/memory.jsonl"
# Load: threads of one client process on the servers of one machine, so tokens/s here says how the swarm
# shares out the work, not what separate machines would reach.
python benchmarks/load.py --model mid --clients 1 4 16 --new-tokens 32 \
    --plot "$OUT/load_mid.png" > "$OUT/load_mid.jsonl"
python benchmarks/routing.py --servers 50 120 250 --plot "$OUT/routing.png" > "$OUT/routing.jsonl"
python benchmarks/quant.py --model smollm2 --modes none int8 nf4 --new-tokens 64 \
    --plot "$OUT/quant_smollm2.png" > "$OUT/quant_smollm2.jsonl"
# Emulated WAN: every server behind a delaying proxy. The tiny model's compute is small, so the
# network dominates, as for a real model over real links; 1 thread as for hops_tiny.
python benchmarks/wan.py --model mid --servers 3 --rtt-ms 0 10 50 100 --new-tokens 16 --repeats 2 --plot "$OUT/wan_mid.png" > "$OUT/wan_mid.jsonl"
python benchmarks/wan.py --model tiny --servers 3 6 --rtt-ms 0 10 50 100 --new-tokens 32 --repeats 3 \
    --assisted --client-threads 1 --server-threads 1 --plot "$OUT/wan_tiny.png" > "$OUT/wan_tiny.jsonl"
python benchmarks/summary.py "$OUT"/hops_smollm2.jsonl "$OUT"/hops_mid.jsonl "$OUT"/hops_tiny.jsonl \
    --plot "$OUT/summary.png" > "$OUT/summary.md"
