"""Result verification (issue 21): a server that computes wrong but announces right is caught by other
holders of its blocks, banned, and its steps recomputed, on real servers; honest servers are never
flagged. The liar is real too: a server started on a copy of the checkpoint with one block's weights
changed (the model id, a hash of the config, is the same), as a volunteer's corrupted download would be.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardnet import ShardedModel
from shardnet.client.config import ClientConfig
from shardnet.client.trust import ServerTrust
from shardnet.client.verification import TOLERANCE, relative_error
from shardnet.errors import ConfigError
from tests.conftest import prompt, reference, running_swarm, shardnet_status

GREEDY = dict(do_sample=False, eos_token_id=None)
# Two liars: one holds every block (so routing prefers its one hop), one holds 3:6 (a route's second hop).
# Two honest chains hold every block too. Each test keeps one liar out (or both), so the one it meets is
# among three holders of its blocks.
LIARS = [(0, 6, 1), (3, 6, 4)]  # span, and the block whose weights are changed
HONEST = [(0, 3), (0, 3), (3, 6), (3, 6)]


def corrupted_copy(source: Path, dest: Path, block: int, noise: float, seed: int = 5) -> Path:
    """``source`` with noise added to one block's MLP output weights: same config, so same model id."""
    shutil.copytree(source, dest)
    generator = torch.Generator().manual_seed(seed)
    name = f"model.layers.{block}.mlp.down_proj.weight"
    for path in dest.glob("*.safetensors"):
        tensors = load_file(path)
        if name in tensors:
            weight = tensors[name]
            tensors[name] = weight + noise * torch.randn(weight.shape, generator=generator)
            save_file(tensors, path, metadata={"format": "pt"})
            return dest
    raise AssertionError(f"{name} not in {source}")


@pytest.fixture(scope="module")
def liar_swarm(llama_untied, tmp_path_factory):
    folder = tmp_path_factory.mktemp("liars")
    args = [
        ["--model", str(corrupted_copy(llama_untied, folder / f"liar{block}", block=block, noise=0.05))]
        for _, _, block in LIARS
    ]
    spans = [(start, end) for start, end, _ in LIARS] + HONEST
    yield from running_swarm(
        llama_untied, spans, tmp_path_factory.mktemp("liar_logs"), server_args=args + [[] for _ in HONEST]
    )


@pytest.fixture
def fresh_trust(monkeypatch):
    """A process-wide trust of its own: suspicions from another test do not carry over."""
    monkeypatch.setattr(ServerTrust, "_shared", None)


@pytest.fixture(scope="module")
def status(liar_swarm) -> dict:
    """`shardnet status --json` of the swarm, as a user would read it."""
    return json.loads(shardnet_status(liar_swarm, "--json"))


@pytest.fixture(scope="module")
def liar(status) -> str:
    """The liar holding every block."""
    (peer,) = [s["peer_id"] for s in status["servers"] if s["span"] == "0:6"]
    return peer


@pytest.fixture(scope="module")
def second_liar(status) -> str:
    """The liar holding 3:6: the holder of 3:6 whose digest of block 4 differs."""
    (peer,) = [s["peer_id"] for s in status["servers"] if s["span"] == "3:6" and s["weights"] == "differs"]
    return peer


def test_every_output_is_exact_with_a_liar_when_every_step_is_checked(
    liar_swarm, liar, second_liar, llama_untied, fresh_trust, caplog
):
    local = reference(llama_untied)
    with ShardedModel.from_pretrained(
        llama_untied, liar_swarm.initial_peers, verify_fraction=1.0, blocked_servers=[second_liar]
    ) as model:
        with caplog.at_level(logging.WARNING, logger="shardnet.client.trust"):
            # Each generation draws its route (often the liar's single hop) and witnesses anew: the liar,
            # once used either way, is caught at its first step; every output is exact all along.
            for generation in range(8):
                ids, mask = prompt(1 + generation % 2, seed=generation)
                got = model.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
                want = local.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
                assert torch.equal(got, want), f"generation {generation}"
                if model.suspected_servers and generation >= 2:
                    break
        assert model.suspected_servers == frozenset({liar})
        assert model.health.counts()["suspected"] == 1  # found once, then never routed to again
    evidence = [r.getMessage() for r in caplog.records if liar in r.getMessage()]
    # as the route's hop (blocks 0:6) or as a witness of a hop of the other route (0:3 or 3:6)
    assert evidence and "wrong; not using it again" in evidence[0] and "third holder" in evidence[0]


def test_the_default_fraction_finds_the_liar_within_a_few_generations(
    liar_swarm, liar, second_liar, llama_untied, fresh_trust
):
    local = reference(llama_untied)
    with ShardedModel.from_pretrained(
        llama_untied, liar_swarm.initial_peers, blocked_servers=[second_liar]
    ) as model:
        assert model.client_config.verify_fraction == 0.05
        for generation in range(16):
            ids, _ = prompt(1, seed=10 + generation)
            model.generate(ids, max_new_tokens=24, **GREEDY)
            if model.suspected_servers:
                break
        assert model.suspected_servers == frozenset({liar}), f"not found in {generation + 1} generations"
        ids, _ = prompt(1, seed=99)  # once found, nothing goes through it
        got = model.generate(ids, max_new_tokens=12, **GREEDY)
        assert torch.equal(got, local.generate(ids, max_new_tokens=12, **GREEDY))


def test_a_liar_on_a_later_hop_of_a_pushed_route_is_caught_and_every_output_exact(
    liar_swarm, liar, second_liar, llama_untied, fresh_trust
):
    """The liar holds 3:6 beside two honest holders; the route is 0:3 then 3:6, pushed server to server.
    Each generation draws its route and witnesses anew: the liar, once used, is caught at its first step."""
    local = reference(llama_untied)
    with ShardedModel.from_pretrained(
        llama_untied, liar_swarm.initial_peers, verify_fraction=1.0, blocked_servers=[liar]
    ) as model:
        for generation in range(8):
            ids, _ = prompt(1, seed=40 + generation)
            got = model.generate(ids, max_new_tokens=6, **GREEDY)
            assert torch.equal(got, local.generate(ids, max_new_tokens=6, **GREEDY)), generation
            if model.suspected_servers:
                break
        assert model.suspected_servers == frozenset({second_liar})


def test_stateless_forwards_are_checked_too(liar_swarm, liar, second_liar, llama_untied, fresh_trust):
    """``model(ids)`` without a cache (what lm-eval's loglikelihood runs): logits exact with F = 1.0."""
    local = reference(llama_untied)
    with ShardedModel.from_pretrained(
        llama_untied, liar_swarm.initial_peers, verify_fraction=1.0, blocked_servers=[second_liar]
    ) as model:
        for call in range(8):
            ids, mask = prompt(2, seed=60 + call)
            with torch.no_grad():
                got = model(ids, attention_mask=mask).logits
                want = local(ids, attention_mask=mask).logits
            rows = mask.bool()  # padding positions' logits are not compared (nor used)
            assert torch.allclose(got[rows], want[rows], atol=1e-4), call
            if model.suspected_servers and call >= 2:
                break
        assert model.suspected_servers == frozenset({liar})


def test_honest_servers_batched_are_never_flagged_in_thirty_generations(
    liar_swarm, liar, second_liar, llama_untied, fresh_trust
):
    """fp32, batching on (three clients at once), every step checked, the liars kept out: nobody flagged."""
    local = reference(llama_untied)
    with ShardedModel.from_pretrained(
        llama_untied, liar_swarm.initial_peers, verify_fraction=1.0, blocked_servers=[liar, second_liar]
    ) as model:
        seeds, mismatched, lock = iter(range(30)), [], threading.Lock()

        def client() -> None:
            while (seed := next(seeds, None)) is not None:
                ids, _ = prompt(1, seed=100 + seed)
                got = model.generate(ids, max_new_tokens=8, **GREEDY)
                with lock:
                    if not torch.equal(got, local.generate(ids, max_new_tokens=8, **GREEDY)):
                        mismatched.append(seed)

        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        counts = model.health.counts()
        assert not model.suspected_servers and not mismatched
        assert counts.get("disputes", 0) == 0 and counts["checks"] >= 30 * 8
        assert max(model.health.check_errors()) <= TOLERANCE[torch.float32]


def test_beam_search_stays_exact_with_witnesses_following_its_reorders(
    liar_swarm, liar, second_liar, llama_untied, fresh_trust
):
    local = reference(llama_untied)
    ids, _ = prompt(1, seed=7)
    beams = dict(num_beams=3, do_sample=False, max_new_tokens=8, eos_token_id=None)
    with ShardedModel.from_pretrained(
        llama_untied, liar_swarm.initial_peers, verify_fraction=1.0, blocked_servers=[liar, second_liar]
    ) as model:
        assert torch.equal(model.generate(ids, **beams), local.generate(ids, **beams))
        assert not model.suspected_servers and model.health.counts().get("disputes", 0) == 0


def test_two_holders_that_disagree_condemn_nobody(
    liar_swarm, liar, second_liar, status, llama_untied, fresh_trust, caplog
):
    """The liar and one honest chain only (either may be the route, the other its witness): no third
    holder can decide, so nobody is suspected."""
    one_chain = {}
    for server in status["servers"]:  # the first honest holder of each span is blocked
        if server["peer_id"] not in (liar, second_liar):
            one_chain.setdefault(server["span"], server["peer_id"])
    with ShardedModel.from_pretrained(
        llama_untied,
        liar_swarm.initial_peers,
        verify_fraction=1.0,
        blocked_servers=[*one_chain.values(), second_liar],
    ) as model:
        with caplog.at_level(logging.WARNING, logger="shardnet.client.verification"):
            ids, _ = prompt(1, seed=3)
            model.generate(ids, max_new_tokens=2, **GREEDY)
        assert not model.suspected_servers
        assert model.health.counts()["disputes"] >= 1
    assert any("no third holder can decide" in r.getMessage() for r in caplog.records)


def test_status_tells_the_liars_by_their_weights(status, liar, second_liar):
    weights = {s["peer_id"]: s["weights"] for s in status["servers"]}
    assert weights.pop(liar) == "differs" and weights.pop(second_liar) == "differs"
    assert list(weights.values()) == ["ok"] * 4


def test_relative_error_per_position():
    reference_ = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]])  # [batch, positions, hidden]
    claimed = reference_.clone()
    claimed[0, 1, 0] = 1.5  # 50% off at position 1
    claimed[0, 2, 1] = float("nan")
    error = relative_error(claimed, reference_, None)
    assert error[0, 0] == 0 and error[0, 1] == pytest.approx(0.5) and error[0, 2] == float("inf")
    masked = relative_error(claimed, reference_, torch.tensor([[1, 0, 0]]))  # padding is not compared
    assert masked.max() == 0


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_verify_fraction_out_of_range_is_a_config_error(fraction):
    with pytest.raises(ConfigError, match="verify_fraction"):
        ClientConfig(verify_fraction=fraction)
