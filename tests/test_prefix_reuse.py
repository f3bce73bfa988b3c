"""Prefix reuse: a session whose prompt starts with a kept prefix skips that part of its prefill, and its
outputs stay those of a server that keeps nothing.

In-process on every architecture: a first session computes and keeps the prompt's blocks; a second one
with the same prefix and another ending starts from them. Both sessions' prefill and decode outputs must
equal a backend without a prefix store (bit for bit on the kept positions, which are returned as kept).
Padded prompts and explicit positions never hit; a prefill in several chunks that a sliding window
cropped keeps nothing.
On real processes (tests/test_prefix_swarm.py): generation equals local transformers and the hits show
in Info and in ``shardnet status --json``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from shardnet.models import adapter_for
from shardnet.models.checkpoint import Checkpoint
from shardnet.server.backend import SpanBackend, SpanLimits, StepInput
from shardnet.server.prefix_reuse import BLOCK_TOKENS, PrefixStore
from shardnet.server.sessions import Session
from shardnet.server.step_path import run_step

from .arch_configs import ARCHITECTURES, build_model

SHARED = 3 * BLOCK_TOKENS + 5  # the common prefix: three whole blocks and a part of the fourth
START, END = 1, 4  # sessions run a part of the span (absolute block indices)


def _backend(path, store: PrefixStore | None) -> SpanBackend:
    config = AutoConfig.from_pretrained(path)
    span = adapter_for(config).load_span(Checkpoint(path), config, 0, 4, torch.float32)
    limits = SpanLimits("test", 0, 4, config.hidden_size, 8, 512, 512)
    return SpanBackend(span, torch.float32, limits, prefix=store)


def _session(backend: SpanBackend, name: str, client: str = "ipv4:127.0.0.1:1", batch: int = 1) -> Session:
    return Session(name, START, END, batch, 512, backend.span.new_cache(), client=client)


def _prompts(hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(1, SHARED, hidden_size, generator=generator)
    first = torch.cat([shared, torch.randn(1, 20, hidden_size, generator=generator)], dim=1)
    second = torch.cat([shared, torch.randn(1, 9, hidden_size, generator=generator)], dim=1)
    return first, second


def _run(backend: SpanBackend, session: Session, prompt: torch.Tensor, decode: int = 3) -> list[torch.Tensor]:
    """The prefill's output, then ``decode`` decode steps' outputs (fed their own last output)."""
    outs = [
        run_step(backend, session, StepInput(prompt, None, torch.arange(prompt.shape[1]).unsqueeze(0)))[0]
    ]
    for _ in range(decode):
        outs.append(run_step(backend, session, StepInput(outs[-1][:, -1:], None, None))[0])
    return outs


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_a_kept_prefix_is_skipped_and_outputs_stay_exact(name, tmp_path):
    path = build_model(name, tmp_path / name)
    store = PrefixStore(max_tokens=4096)
    reusing, plain = _backend(path, store), _backend(path, None)
    first, second = _prompts(plain.limits.hidden_size)

    for prompt in (first, second):
        want = _run(plain, _session(plain, "plain"), prompt)
        session = _session(reusing, "reusing")
        got = _run(reusing, session, prompt)
        for index, (out, expected) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"{name} step {index}")
        assert session.position == prompt.shape[1] + 3

    # Sliding windows (4 positions here) included: a one-chunk prefill leaves every position in the layer.
    assert store.hits == 1
    assert store.tokens_reused == 3 * BLOCK_TOKENS  # the whole blocks of the shared part
    assert store.tokens_used == 3 * BLOCK_TOKENS  # both prompts' three whole blocks are the same ones


def test_kept_outputs_are_returned_bit_for_bit_and_a_whole_kept_prompt_computes_nothing(tmp_path):
    path = build_model("llama", tmp_path / "llama")
    store = PrefixStore(max_tokens=4096)
    backend = _backend(path, store)
    prompt = _prompts(backend.limits.hidden_size)[0][:, : 2 * BLOCK_TOKENS]
    first = _run(backend, _session(backend, "a"), prompt, decode=0)[0]
    again, compute_s = run_step(backend, _session(backend, "b"), StepInput(prompt, None, None))
    assert torch.equal(again, first)  # the next server hashes these bytes: they must be the same
    assert compute_s == 0.0
    assert store.tokens_reused == 2 * BLOCK_TOKENS


def test_prefixes_stay_with_their_client_unless_shared(tmp_path):
    path = build_model("llama", tmp_path / "llama")
    prompt = _prompts(64)[0]
    for shared, hits in ((False, 0), (True, 1)):
        store = PrefixStore(max_tokens=4096, shared=shared)
        backend = _backend(path, store)
        _run(backend, _session(backend, "a", client="ipv4:127.0.0.1:1000"), prompt, decode=0)
        _run(backend, _session(backend, "b", client="ipv4:127.0.0.1:2000"), prompt, decode=0)
        assert store.hits == hits


def test_padding_explicit_positions_and_a_full_store_fall_back_to_a_plain_prefill(tmp_path):
    path = build_model("llama", tmp_path / "llama")
    store = PrefixStore(max_tokens=4096)
    backend = _backend(path, store)
    plain = _backend(path, None)
    prompt = _prompts(backend.limits.hidden_size)[0].repeat(2, 1, 1)  # batch 2, the first row left-padded
    mask = torch.ones(2, prompt.shape[1], dtype=torch.int64)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for _ in range(2):
        step = StepInput(prompt, mask, positions)
        got = run_step(backend, _session(backend, "padded", batch=2), step)[0]
        torch.testing.assert_close(got, run_step(plain, _session(plain, "p", batch=2), step)[0])
    shifted = StepInput(prompt[:1], None, torch.arange(5, 5 + prompt.shape[1]).unsqueeze(0))
    for _ in range(2):
        run_step(backend, _session(backend, "shifted"), shifted)
    assert (store.hits, store.tokens_used) == (0, 0)

    small = PrefixStore(max_tokens=2 * BLOCK_TOKENS)  # keeps the first two blocks only
    backend = _backend(path, small)
    for _ in range(2):
        _run(backend, _session(backend, "small"), prompt[:1], decode=0)
    assert (small.hits, small.tokens_reused, small.tokens_used) == (1, 2 * BLOCK_TOKENS, 2 * BLOCK_TOKENS)


def test_the_least_recently_used_prefix_goes_first_and_its_first_blocks_last(tmp_path):
    path = build_model("llama", tmp_path / "llama")
    store = PrefixStore(max_tokens=7 * BLOCK_TOKENS)
    backend = _backend(path, store)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randn(1, 3 * BLOCK_TOKENS, 64, generator=generator) for _ in range(3)]
    for prompt in prompts:  # 9 blocks offered, 7 kept: the first prompt's last two blocks went first
        _run(backend, _session(backend, "s"), prompt, decode=0)
    assert store.tokens_used == 7 * BLOCK_TOKENS
    _run(backend, _session(backend, "again"), prompts[0], decode=0)
    assert (store.hits, store.tokens_reused) == (1, BLOCK_TOKENS)  # its first block was still kept
