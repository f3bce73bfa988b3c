"""Prefix reuse: the KV of recent prompt prefixes, kept so a new session that starts the same way skips
that part of its prefill. The client does not need to know.

A server never sees tokens, only the hidden states that enter its span; those are a deterministic
function of the tokens before them, so they address a prefix as well as tokens would. A session's first
step (position 0, no padding, the default positions) is cut into blocks of ``BLOCK_TOKENS`` positions,
and block ``i`` is named by a hash chain: ``digest_i = H(digest_{i-1}, block i's input bytes)``, seeded
with the span, the dtype, the batch shape and the scope. The store keeps, per digest, that block's keys and
values in every layer of the span and the span's output for those positions, least recently used first
out, within ``max_tokens`` (batch x positions).

On a hit the session's cache is filled with the kept blocks, only the rest of the prompt is computed,
and the kept outputs are returned for the kept positions: byte for byte what the first session got, so
the next server of the chain finds the same digests and skips the same prefix.

**Scope.** By default a prefix is reused only for the client connection that sent it (``scope`` = its
peer address): another client cannot learn from a faster first token that someone sent the same
prompt. ``--share-prefix-cache`` uses one scope for everybody, which opens that timing side channel
(README, "what a volunteer exposes").

Not reused: padded batches, explicit positions, sessions that roll back or reorder before their first
step, and spans whose layers dropped positions during the prefill (a sliding-window layer keeps every
position of a one-chunk prefill, but crops at the next chunk: a prefill longer than --max-chunk-tokens
then leaves no blocks to cut out). Those run as before.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 32  # positions per content-addressed block


@dataclass(frozen=True)
class _Block:
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer of the span: keys, values [batch, kv, B, dim]
    outputs: torch.Tensor  # the span's output for these positions [batch, B, hidden]
    tokens: int  # batch x B


@dataclass
class PrefixHit:
    """The kept blocks a first step starts with (``blocks`` may be empty) and the digests of all its
    full blocks, so the blocks computed now can be kept under their names."""

    digests: list[bytes]
    blocks: list[_Block]

    @property
    def positions(self) -> int:
        return len(self.blocks) * BLOCK_TOKENS

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """The kept blocks as ``SpanModule.import_cache`` takes them: per layer, keys, values, positions."""
        count = len(self.blocks[0].layers)
        joined = []
        for index in range(count):
            keys = torch.cat([block.layers[index][0] for block in self.blocks], dim=-2)
            values = torch.cat([block.layers[index][1] for block in self.blocks], dim=-2)
            joined.append((keys, values, self.positions))
        return joined

    def outputs(self) -> torch.Tensor:
        return torch.cat([block.outputs for block in self.blocks], dim=1)  # [batch, kept, hidden]


def block_digests(hidden: torch.Tensor, seed: bytes) -> list[bytes]:
    """The hash chain over the full blocks of ``hidden`` [batch, positions, hidden]."""
    rows = hidden.detach().to("cpu").contiguous()
    digests, previous = [], hashlib.blake2b(seed, digest_size=20).digest()
    for first in range(0, hidden.shape[1] - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        block = rows[:, first : first + BLOCK_TOKENS].contiguous()
        chained = hashlib.blake2b(previous, digest_size=20)
        chained.update(block.view(torch.uint8).numpy())  # read in place: no copy of the block's bytes
        previous = chained.digest()
        digests.append(previous)
    return digests


class PrefixStore:
    """Blocks by digest, least recently used first out, within ``max_tokens``; thread-safe."""

    def __init__(self, max_tokens: int, shared: bool = False):
        self.max_tokens = max_tokens
        self.shared = shared  # one scope for every client (--share-prefix-cache)
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self._lock = threading.Lock()
        self.tokens_used = 0
        self.hits = 0  # first steps that started from a kept prefix
        self.tokens_reused = 0  # positions x batch those hits did not compute

    @property
    def enabled(self) -> bool:
        return self.max_tokens >= BLOCK_TOKENS

    def seed(self, client: str, start: int, end: int, hidden: torch.Tensor, adapter: str = "") -> bytes:
        """What names a prefix besides its hidden states: scope, span, dtype, batch shape, and the LoRA
        adapter (the same inputs give other keys and values with another)."""
        scope = "" if self.shared else client
        return f"{scope}|{start}:{end}|{hidden.dtype}|{hidden.shape[0]}x{hidden.shape[2]}|{adapter}".encode()

    def lookup(self, digests: list[bytes]) -> PrefixHit:
        """The longest kept run of blocks from the first; they are touched last one first, so a prefix's
        earlier blocks, which its longer forms need too, are the last to go."""
        blocks = []
        with self._lock:
            for digest in digests:
                block = self._blocks.get(digest)
                if block is None:
                    break
                blocks.append(block)
            self._touch(digests[: len(blocks)])
            if blocks:
                self.hits += 1
                self.tokens_reused += sum(block.tokens for block in blocks)
        return PrefixHit(digests, blocks)

    def keep(
        self,
        hit: PrefixHit,
        layers: list[tuple[torch.Tensor, torch.Tensor, int]],
        outputs: torch.Tensor,
    ) -> None:
        """Keep the full blocks the step computed: ``layers`` are the span's cache layers after the step
        (keys, values, positions seen), ``outputs`` its whole output [batch, positions, hidden]."""
        if any(keys.shape[-2] != seen for keys, _, seen in layers):
            return  # a layer dropped positions (a sliding window): its blocks cannot be cut out
        tokens = outputs.shape[0] * BLOCK_TOKENS
        fit = min(len(hit.digests), self.max_tokens // tokens)  # the first blocks, as many as the store holds
        new = {}
        for index in range(len(hit.blocks), fit):
            first, last = index * BLOCK_TOKENS, (index + 1) * BLOCK_TOKENS
            new[hit.digests[index]] = _Block(
                layers=[(k[..., first:last, :].clone(), v[..., first:last, :].clone()) for k, v, _ in layers],
                outputs=outputs[:, first:last].clone(),
                tokens=tokens,
            )
        with self._lock:
            for digest, block in new.items():
                if digest not in self._blocks:
                    self._blocks[digest] = block
                    self.tokens_used += block.tokens
            self._touch(hit.digests[:fit])
            while self.tokens_used > self.max_tokens:
                _, dropped = self._blocks.popitem(last=False)
                self.tokens_used -= dropped.tokens

    def _touch(self, digests: list[bytes]) -> None:
        """Most recently used, the first block most (under the lock)."""
        for digest in reversed(digests):
            if digest in self._blocks:
                self._blocks.move_to_end(digest)
