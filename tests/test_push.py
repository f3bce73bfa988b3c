"""Server-to-server push on real processes: each server passes a step's output straight to the next.

The client sends a step to the first server of the route only; the others get it from the server
before them and answer the client on their own streams (whose replies are the replay history). The
tokens must equal local transformers', with push on or off, with beams, and across a kill -9 of the
middle server mid-generation.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from shardnet import ShardedModel
from shardnet.launch import LocalSwarm
from shardnet.wire import pb, pb_grpc
from shardnet.wire.tensors import serialize

from .conftest import OnToken, reference

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def local(llama_untied):
    return reference(llama_untied)


@pytest.fixture(scope="module")
def shared(llama_untied, tmp_path_factory):
    """A 3-server swarm for the tests that leave every server running."""
    local_swarm = LocalSwarm(
        llama_untied, [(0, 2), (2, 4), (4, 6)], log_dir=tmp_path_factory.mktemp("push_logs"), torch_threads=1
    )
    local_swarm.start(timeout_s=180)
    yield local_swarm
    local_swarm.stop()


@pytest.fixture
def swarm(llama_untied, tmp_path):
    """A 3-server swarm of its own, for a test that kills a server."""
    local_swarm = LocalSwarm(llama_untied, [(0, 2), (2, 4), (4, 6)], log_dir=tmp_path, torch_threads=1)
    local_swarm.start(timeout_s=180)
    yield local_swarm
    local_swarm.stop()


def _prompt(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 256, (batch, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[0, :4], mask[0, :4] = 0, 0  # row 0 is left-padded by 4
    return ids, mask


@pytest.mark.parametrize(
    "push", [pytest.param(True, marks=pytest.mark.canary), False], ids=["push", "chained"]
)
def test_greedy_batch2_left_padded_and_beams_match_local(shared, local, push):
    swarm = shared
    ids, mask = _prompt(2)
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers, push=push) as model:
        with model.inference_session(max_length=64) as session:
            got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert session.chain.pushing is push
            assert len(session.route) == 3
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=3)
    want = local.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert got.tolist() == want.tolist()
    assert (
        beams.tolist()
        == local.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=3).tolist()
    )


@pytest.mark.canary
def test_kill_9_of_the_middle_server_with_push_stays_exact(swarm, local):
    ids, mask = _prompt(2, seed=3)
    want = local.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    victim = swarm.servers[1]  # blocks 2:4

    def replace_then_kill() -> None:
        swarm.start_server(2, 4)
        swarm.wait_ready(timeout_s=120)
        victim.kill()
        victim.wait(timeout=30)

    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers, request_timeout_s=20) as model:
        with model.inference_session(max_length=64) as session:
            got = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                streamer=OnToken(5, replace_then_kill),
            )
            assert session.chain.failovers == 1 and session.chain.pushing
    assert victim.poll() is not None
    assert got.tolist() == want.tolist()


def test_a_server_pushes_only_to_announced_servers(shared):
    swarm = shared
    """A request naming an arbitrary next address gets push_error; the step itself is answered."""
    address = f"127.0.0.1:{swarm.online_ports().pop()}"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ShardStub(channel)
        info = stub.Info(pb.InfoRequest(), timeout=10)
        requests = [
            pb.InferenceRequest(
                open=pb.OpenSession(model_id=swarm.model_id, span=info.span, max_length=8, batch_size=1)
            ),
            pb.InferenceRequest(
                step=pb.Step(
                    step_id=1,
                    position=0,
                    hidden_states=serialize(torch.randn(1, 1, 64)),
                    push=[pb.NextHop(address="127.0.0.1:9", push_token=b"x" * 16, step_id=1, position=0)],
                )
            ),
        ]
        opened, stepped = list(stub.Inference(iter(requests), timeout=30))
    assert len(opened.opened.push_token) == 16
    assert list(stepped.step.hidden_states.shape) == [1, 1, 64]
    assert "no server of this model announced" in stepped.step.push_error


def test_a_push_with_a_wrong_token_is_refused(shared):
    swarm = shared
    address = f"127.0.0.1:{swarm.online_ports().pop()}"
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ShardStub(channel).Push(
                pb.PushRequest(push_token=b"guess" * 4, step=pb.Step(step_id=1)), timeout=10
            )
    assert info.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


def test_a_repeated_prompt_prefix_is_reused_on_every_hop_and_stays_exact(shared, local):
    """Two generations whose prompts share 70 tokens: the second skips their two whole blocks on each of
    the three servers (the first server sees embeddings, the others the pushed outputs of the one before)."""
    from shardnet.server.prefix_reuse import BLOCK_TOKENS

    generator = torch.Generator().manual_seed(7)
    system = torch.randint(3, 256, (1, 70), generator=generator)
    ports = sorted(shared.online_ports())
    assert len(ports) == 3
    before = [_info(port) for port in ports]
    with ShardedModel.from_pretrained(shared.model_path, shared.initial_peers) as model:
        for seed in (1, 2):
            ids = torch.cat(
                [system, torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(seed))], 1
            )
            got = model.generate(ids, max_new_tokens=8, do_sample=False)
            assert got.tolist() == local.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    after = [_info(port) for port in ports]
    for old, new in zip(before, after, strict=True):
        assert new.prefix_hits - old.prefix_hits == 1
        assert new.prefix_tokens_reused - old.prefix_tokens_reused == 2 * BLOCK_TOKENS


def _info(port: int) -> pb.InfoResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb_grpc.ShardStub(channel).Info(pb.InfoRequest(), timeout=10)
