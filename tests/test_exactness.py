"""The swarm's numbers equal the local transformers model's (float32, CPU), on every swarm layout."""

from __future__ import annotations

import pytest
import torch

from shardnet import ShardedModel
from shardnet.client.swarm_status import render_table
from shardnet.dht import lookup

from .conftest import reference, shardnet_status

PROMPT_LEN = 9


@pytest.fixture(scope="module")
def client(swarm):
    model = ShardedModel.from_pretrained(swarm.model_path, initial_peers=swarm.initial_peers)
    yield model
    model.close()


@pytest.fixture(scope="module")
def local(swarm):
    return reference(swarm.model_path)


def _batch_left_padded(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, PROMPT_LEN), generator=generator)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # row 0 is left-padded by 4
    return ids, mask


def test_route_covers_every_block(swarm, client):
    route = client.route(refresh=True)
    assert [(hop.start, hop.end) for hop in route] == swarm.spans


def test_logits_match_with_left_padding(client, local):
    ids, mask = _batch_left_padded()
    got = client(ids, attention_mask=mask).logits
    with torch.no_grad():
        want = local(ids, attention_mask=mask).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


def test_logits_match_without_mask(client, local):
    ids = torch.randint(3, 256, (1, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = local(ids).logits
    assert (client(ids).logits - want).abs().max().item() <= 1e-4


def test_greedy_generate_matches(client, local):
    ids = torch.randint(3, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    want = local.generate(ids, max_new_tokens=16, do_sample=False)
    got = client.generate(ids, max_new_tokens=16, do_sample=False)
    assert got.tolist() == want.tolist()


def test_greedy_generate_batch2_left_padding(client, local):
    ids, mask = _batch_left_padded(seed=2)
    want = local.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = client.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert got.tolist() == want.tolist()


def test_two_generates_in_one_session_continue_the_conversation(client, local):
    generator = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, 256, (1, 6), generator=generator)
    more = torch.randint(3, 256, (1, 4), generator=generator)
    with client.inference_session(max_length=64):
        a = client.generate(prompt, max_new_tokens=8)
        b = client.generate(more, max_new_tokens=8)
    assert a.shape == (1, 14) and b.shape == (1, 12)
    want_a = local.generate(prompt, max_new_tokens=8, do_sample=False)
    assert a.tolist() == want_a.tolist()
    concatenated = torch.cat([a, more], dim=1)
    want_b = local.generate(concatenated, max_new_tokens=8, do_sample=False)
    assert b[:, 4:].tolist() == want_b[:, concatenated.shape[1] :].tolist()


def test_sampling_respects_top_k_and_matches_seeded_local(client, local):
    ids = torch.randint(3, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(5))
    kwargs = dict(do_sample=True, temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=10)
    torch.manual_seed(1234)
    got = client.generate(ids, **kwargs)
    torch.manual_seed(1234)
    want = local.generate(ids, **kwargs)
    assert got.tolist() == want.tolist()
    vocab = local.config.vocab_size
    assert ((got >= 0) & (got < vocab)).all()
    with torch.no_grad():
        logits = local(got).logits[0]
    for position in range(PROMPT_LEN, got.shape[1]):
        top = torch.topk(logits[position - 1], 5).indices.tolist()
        assert got[0, position].item() in top


def test_repetition_penalty_and_eos_match_local(client, local):
    ids = torch.randint(3, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(6))
    greedy = local.generate(ids, max_new_tokens=6, do_sample=False)
    eos = int(greedy[0, PROMPT_LEN + 2])  # stop on the third generated token
    kwargs = dict(
        max_new_tokens=12, do_sample=False, repetition_penalty=1.3, eos_token_id=eos, pad_token_id=0
    )
    want = local.generate(ids, **kwargs)
    got = client.generate(ids, **kwargs)
    assert got.tolist() == want.tolist()


# ---- steps longer than a compute chunk: a server runs them in chunks, with the same numbers ----

CHUNK_TOKENS = 8  # batch x positions per compute chunk: batch 2 runs 4 positions at a time


@pytest.fixture(scope="module")
def chunked(llama_untied, tmp_path_factory):
    from shardnet.launch import LocalSwarm

    swarm = LocalSwarm(
        llama_untied,
        [(0, 3), (3, 6)],
        log_dir=tmp_path_factory.mktemp("chunked_logs"),
        torch_threads=1,
        extra_args=["--max-chunk-tokens", str(CHUNK_TOKENS)],
    )
    swarm.start(timeout_s=180)
    model = ShardedModel.from_pretrained(swarm.model_path, initial_peers=swarm.initial_peers)
    yield model, reference(llama_untied)
    model.close()
    swarm.stop()


def _long_left_padded(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[0, :7], mask[0, :7] = 0, 0  # the padding spans two chunks of row 0
    return ids, mask


def test_chunked_forward_logits_match_with_left_padding(chunked):
    client, local = chunked
    ids, mask = _long_left_padded(37, seed=7)  # 10 chunks, the last one short
    with torch.no_grad():
        want = local(ids, attention_mask=mask).logits
    assert (client(ids, attention_mask=mask).logits - want).abs().max().item() <= 1e-4


def test_chunked_session_logits_and_greedy_tokens_match(chunked):
    client, local = chunked
    ids, mask = _long_left_padded(30, seed=8)
    with torch.no_grad():
        want = local(ids, attention_mask=mask).logits
    with client.inference_session(max_length=64):  # the prefill is one session step, run in 8 chunks
        got = client(ids, attention_mask=mask).logits
    assert (got - want).abs().max().item() <= 1e-4
    want_tokens = local.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got_tokens = client.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert got_tokens.tolist() == want_tokens.tolist()


def test_chunked_steps_on_top_of_a_cache_match(chunked):
    client, local = chunked
    generator = torch.Generator().manual_seed(9)
    prompt = torch.randint(3, 256, (1, 21), generator=generator)
    more = torch.randint(
        3, 256, (1, 13), generator=generator
    )  # a second long step, after 21 cached positions
    with client.inference_session(max_length=80):
        first = client(prompt).logits
        second = client(more).logits
    with torch.no_grad():
        want = local(torch.cat([prompt, more], dim=1)).logits
    assert (first - want[:, :21]).abs().max().item() <= 1e-4
    assert (second - want[:, 21:]).abs().max().item() <= 1e-4


def test_status_lists_servers(swarm, request):
    """`shardnet status` on each layout (here, where the layouts' swarms are running anyway): as a user
    runs it on the three-server layout, and its table from this process on the others (a command costs
    about 4 s of the suite's 10 minutes)."""
    if request.node.callspec.params["swarm"] == "three_uneven_tied":
        stdout = shardnet_status(swarm)
    else:
        stdout = render_table(
            lookup(swarm._probe, swarm.model_id, swarm.num_blocks), swarm.model_id, swarm.num_blocks, "llama"
        )
    assert f"{len(swarm.spans)} servers" in stdout
    assert "(architecture llama)" in stdout
    for start, end in swarm.spans:
        assert f"{start}:{end}" in stdout
    assert "all blocks covered" in stdout
