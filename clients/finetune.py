"""Prompt tuning through a running swarm: train a few prompts on a small local text and watch the loss fall.

    python clients/finetune.py --model ./smollm2 --initial-peers /ip4/127.0.0.1/tcp/.../p2p/... \
        --tuning-mode deep_ptune --pre-seq-len 8 --steps 12

The prompts live here, on the client; every forward and backward pass runs through the swarm's servers,
whose weights never change (README "Fine-tuning"). Prints one JSON line per step, then the first and last
loss. The text defaults to clients/data/finetune.txt (a few short paragraphs), cut into --seq-len token
windows, --batch-size of them a step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from shardnet import ShardedModel

TEXT = Path(__file__).parent / "data" / "finetune.txt"


def windows(token_ids: list[int], seq_len: int) -> torch.Tensor:
    """The text's tokens cut into [count, seq_len] windows (the tail that does not fill one is dropped)."""
    count = len(token_ids) // seq_len
    if count == 0:
        raise SystemExit(f"the text has {len(token_ids)} tokens, fewer than --seq-len {seq_len}")
    return torch.tensor(token_ids[: count * seq_len]).view(count, seq_len)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="model folder with a tokenizer")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--text", type=Path, default=TEXT, help="a UTF-8 text file to train on")
    parser.add_argument("--tuning-mode", choices=["ptune", "deep_ptune"], default="deep_ptune")
    parser.add_argument("--pre-seq-len", type=int, default=8, help="trainable prompt positions")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per training window")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per step")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = windows(tokenizer(args.text.read_text(encoding="utf-8")).input_ids, args.seq_len)
    torch.manual_seed(0)
    with ShardedModel.from_pretrained(
        args.model,
        initial_peers=args.initial_peers,
        tuning_mode=args.tuning_mode,
        pre_seq_len=args.pre_seq_len,
    ) as model:
        optimizer = torch.optim.Adam(model.prompts.parameters(), lr=args.lr)
        losses = []
        for step in range(args.steps):
            rows = [(step * args.batch_size + i) % len(data) for i in range(args.batch_size)]
            batch = data[rows]  # [batch, seq_len]
            began = time.perf_counter()
            optimizer.zero_grad()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()  # through every server of the route, back to the prompts
            optimizer.step()
            losses.append(loss.item())
            print(
                json.dumps(
                    {
                        "step": step + 1,
                        "loss": round(loss.item(), 4),
                        "s": round(time.perf_counter() - began, 2),
                    }
                )
            )
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps", file=sys.stderr)
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
