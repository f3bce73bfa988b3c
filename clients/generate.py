"""Generate through a running swarm with the public API: a minimal client to copy from.

    python clients/generate.py --model ./llama --initial-peers /ip4/127.0.0.1/tcp/.../p2p/... \
        --prompt "The capital of France is" --max-new-tokens 32

Uses the model folder's tokenizer if it has one; otherwise --prompt is a list of token ids ("1 2 3").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from shardnet import ShardedModel


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--temperature", type=float, default=None, help="sample at this temperature (default greedy)"
    )
    args = parser.parse_args()

    tokenizer = None
    if (args.model / "tokenizer.json").exists() or (args.model / "tokenizer.model").exists():
        from transformers import AutoTokenizer, TextStreamer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        streamer = TextStreamer(tokenizer, skip_prompt=False)
    else:
        input_ids = torch.tensor([[int(token) for token in args.prompt.split()]])
        streamer = None

    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature else {}
    with ShardedModel.from_pretrained(args.model, initial_peers=args.initial_peers) as model:
        output = model.generate(input_ids, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
    if tokenizer is None:
        print(" ".join(str(token) for token in output[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
