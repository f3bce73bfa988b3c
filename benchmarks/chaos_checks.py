"""The checker of ``chaos.py``: the generations the clients run, each with its local transformers output,
and what a mismatch looks like from the local model's side.

Seeded sampling is exact and touches no global RNG: ``SeededSampler`` draws Gumbel noise from the
generation's seed and the sequence length alone and keeps only the drawn token (``do_sample=False``), so the
swarm's ``generate`` and the local one pick the same tokens from the same logits, in any thread.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

GENERATE = dict(do_sample=False, eos_token_id=None, pad_token_id=0)  # no EOS: exactly max_new_tokens


class SeededSampler(LogitsProcessor):
    """Top-k sampling by Gumbel-max, with noise drawn from (seed, sequence length) only: thread-safe and
    identical in the swarm's generate and the local one. With ``do_sample=False``: keeps the drawn token."""

    def __init__(self, seed: int, top_k: int, temperature: float):
        self.seed, self.top_k, self.temperature = seed, top_k, temperature

    def perturbed(self, length: int, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature  # [batch, vocab]
        kth = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + length)
        uniform = torch.rand(scores.shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        return scores + (-torch.log(-torch.log(uniform))).float()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        choice = self.perturbed(input_ids.shape[1], scores).argmax(dim=-1)  # [batch]
        return torch.full_like(scores, float("-inf")).scatter_(-1, choice[:, None], 0.0)


@dataclass
class Spec:
    """One generation: its inputs, settings and the local transformers output."""

    index: int
    input_ids: torch.Tensor  # [batch, width], left-padded with 0
    attention_mask: torch.Tensor  # [batch, width]
    new_tokens: int
    sampler: dict | None  # SeededSampler's arguments; None: greedy
    reference: torch.Tensor | None = None  # [batch, width + new_tokens]

    def kwargs(self) -> dict:
        processors = LogitsProcessorList([SeededSampler(**self.sampler)]) if self.sampler else None
        return dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            max_new_tokens=self.new_tokens,
            logits_processor=processors,
            **GENERATE,
        )

    def settings(self) -> dict:
        return {
            "spec": self.index,
            "batch": self.input_ids.shape[0],
            "prompt_lens": self.attention_mask.sum(-1).tolist(),
            "new_tokens": self.new_tokens,
            "mode": "sampled" if self.sampler else "greedy",
            **(self.sampler or {}),
        }


def make_specs(seed: int, count: int, vocab: int) -> list[Spec]:
    rng, specs = random.Random(seed), []
    for index in range(count):
        lens = [rng.randint(4, 30) for _ in range(rng.choice((1, 2)))]
        ids = torch.zeros(len(lens), max(lens), dtype=torch.long)  # [batch, width]
        mask = torch.zeros_like(ids)
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        for row, n in enumerate(lens):
            ids[row, -n:] = torch.randint(3, vocab, (n,), generator=generator)
            mask[row, -n:] = 1
        sampler = None
        if rng.random() < 0.5:
            sampler = dict(
                seed=rng.randrange(2**31),
                top_k=rng.choice((5, 20, 50)),
                temperature=rng.choice((0.7, 1.0, 1.3)),
            )
        specs.append(Spec(index, ids, mask, rng.randint(8, 40), sampler))
    return specs


def explain(spec: Spec, got: torch.Tensor, local) -> dict:
    """Where ``got`` first leaves the local output, and how close a call the local model had there."""
    want, width = spec.reference, spec.input_ids.shape[1]
    n = min(got.shape[1], want.shape[1])
    differs = (got[:, :n] != want[:, :n]).nonzero().tolist()  # [[row, column], ...]
    if not differs:
        return {"position": n - width, "shape": list(got.shape), "expected_shape": list(want.shape)}
    row, column = min(differs, key=lambda rc: (rc[1], rc[0]))
    if column < width:  # generate returned a different prompt: nothing to ask the local model
        return {"row": row, "position": column - width, "prompt_differs": True}
    keep = torch.cat([spec.attention_mask[row], torch.ones(column - width, dtype=torch.long)]).bool()
    prefix = want[row, :column][keep]  # the row's tokens before the difference, padding dropped
    with torch.no_grad():
        logits = local(prefix[None]).logits[0, -1].float()  # [vocab]
    top = logits.topk(2)
    found = {
        "row": row,
        "position": column - width,
        "local_token": int(want[row, column]),
        "swarm_token": int(got[row, column]),
        "local_top2": top.indices.tolist(),
        "logit_margin": round(float(top.values[0] - top.values[1]), 5),
    }
    if spec.sampler:  # what decided the draw: the margin of the perturbed scores
        scores = torch.zeros(want.shape[0], logits.shape[0])
        scores[row] = logits
        drawn = SeededSampler(**spec.sampler).perturbed(column, scores)[row].topk(2)
        found["sampling_top2"] = drawn.indices.tolist()
        found["sampling_margin"] = round(float(drawn.values[0] - drawn.values[1]), 5)
    return found


class Stamps:
    """A generate() streamer: the time of every new token (the first put is the prompt)."""

    def __init__(self, clock) -> None:
        self.clock, self.times, self._prompt_seen = clock, [clock()], False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(self.clock())
        self._prompt_seen = True

    def end(self) -> None:
        pass

    def gaps_s(self) -> list[float]:  # call to first token, then between tokens
        return [b - a for a, b in zip(self.times[:-1], self.times[1:], strict=True)]
