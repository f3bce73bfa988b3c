"""Conformance: every supported architecture, served by a real swarm, equals local transformers.

One line per architecture in ``tests/arch_configs.py``. Each gets 3 servers with uneven spans (one of a
single block); prompts (9 tokens) are longer than the sliding window (4) of the families that have one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardnet import ShardedModel
from shardnet.launch import LocalSwarm

from .arch_configs import ARCHITECTURES, WINDOW, build_model

PROMPT_LEN = 9
SPANS = [(0, 1), (1, 3), (3, 4)]
assert PROMPT_LEN > WINDOW


ORDER = list(ARCHITECTURES)
LAUNCH_AHEAD = 2  # swarms loading while one is tested: their imports fill the cores the tests leave idle


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Swarms started ahead of their tests, by architecture; whatever was not used stops with the module."""
    pending: dict[str, tuple[Path, LocalSwarm]] = {}

    def launch(arch: str) -> tuple[Path, LocalSwarm]:
        path = build_model(arch, tmp_path_factory.mktemp(arch))
        swarm = LocalSwarm(path, SPANS, log_dir=tmp_path_factory.mktemp(f"logs_{arch}"), torch_threads=1)
        try:
            swarm.start_dht()
            for start, end in SPANS:
                swarm.start_server(start, end)
        except BaseException:
            swarm.stop()
            raise
        return path, swarm

    yield pending, launch
    for _, swarm in pending.values():
        swarm.stop()


@pytest.fixture(scope="module", params=ORDER)
def served(request, launched):
    """(swarm client, local transformers model) for one architecture; the swarm stops with the module's
    last test of that architecture. The next architectures' swarms start now, so their processes load
    while this one is tested (started before this test's client: no DHT fork sees a gRPC call in flight)."""
    pending, launch = launched
    arch = request.param
    path, swarm = pending.pop(arch, None) or launch(arch)
    for following in ORDER[ORDER.index(arch) + 1 :][:LAUNCH_AHEAD]:
        if following not in pending:
            pending[following] = launch(following)
    try:
        swarm.wait_ready(timeout_s=180)
        client = ShardedModel.from_pretrained(path, swarm.initial_peers)
    except BaseException:
        swarm.stop()
        raise
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield client, local
    client.close()
    swarm.stop()


def _left_padded(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 256, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # row 0 is left-padded by 3
    return ids, mask


def test_logits_match_with_left_padding(served):
    client, local = served
    ids, mask = _left_padded(0)
    with torch.no_grad():
        want = local(ids, attention_mask=mask).logits
    got = client(ids, attention_mask=mask).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    assert [(hop.start, hop.end) for hop in client.last_route] == SPANS


def test_greedy_tokens_match_batch2_left_padded(served):
    client, local = served
    ids, mask = _left_padded(1)
    want = local.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = client.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert got.tolist() == want.tolist()


def test_session_continues_across_two_generate_calls(served):
    client, local = served
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 256, (1, PROMPT_LEN), generator=generator)
    more = torch.randint(3, 256, (1, 3), generator=generator)
    with client.inference_session(max_length=40):
        first = client.generate(prompt, max_new_tokens=6, do_sample=False)
        second = client.generate(more, max_new_tokens=6, do_sample=False)
    assert first.tolist() == local.generate(prompt, max_new_tokens=6, do_sample=False).tolist()
    concatenated = torch.cat([first, more], dim=1)
    want = local.generate(concatenated, max_new_tokens=6, do_sample=False)
    assert second[:, more.shape[1] :].tolist() == want[:, concatenated.shape[1] :].tolist()
