"""Server-to-server push on real processes: each server passes a step's output straight to the next.

The client sends a step to the first server of the route only; the others get it from the server
before them and answer the client on their own streams (whose replies are the replay history). The
tokens must equal local transformers', with push on or off, with beams, and across a kill -9 of the
middle server mid-generation.

What such a swarm reports is tested on it too: the per-hop timings of each step (network, queue, compute,
return), which must add up to the step's measured time, and each server's Prometheus ``/metrics``, which
must count what the client did.
"""

from __future__ import annotations

import subprocess

import grpc
import pytest
import torch

from shardnet import ShardedModel
from shardnet.launch import LocalSwarm
from shardnet.wire import pb, pb_grpc
from shardnet.wire.tensors import serialize

from .conftest import OnToken, free_port, reference

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def local(llama_untied):
    return reference(llama_untied)


@pytest.fixture(scope="module")
def shared(llama_untied, tmp_path_factory):
    """A 3-server swarm for the tests that leave every server running; each exposes ``/metrics``
    (``metrics_ports``, in span order)."""
    ports = [free_port() for _ in range(3)]
    local_swarm = LocalSwarm(
        llama_untied,
        [(0, 2), (2, 4), (4, 6)],
        log_dir=tmp_path_factory.mktemp("push_logs"),
        torch_threads=1,
        server_args=[["--metrics-port", str(port)] for port in ports],
    )
    local_swarm.start(timeout_s=180)
    local_swarm.metrics_ports = ports
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


def test_per_hop_timings_add_up_to_the_step_under_push(shared):
    """Each step's hops (network into the hop, queue, compute, return to the client) add up to the step's
    time as the client measured it; the answers the client has not read yet are pending, not zero."""
    ids, _ = _prompt(1, seed=5)
    # No verification: a check reads every answer of the step it checks (client/verification.py).
    with ShardedModel.from_pretrained(shared.model_path, shared.initial_peers, verify_fraction=0) as model:
        with model.inference_session(max_length=64) as session:
            model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            spans = [f"{hop.start}:{hop.end}" for hop in session.route]
            last = session.step_timings[-1].as_ms()  # answers not read yet (a race) show as pending
            assert all((hop["total_ms"] is None) == hop["pending"] for hop in last["hops"])
            assert (last["critical_path_ms"] is None) == last["pending"]
        steps = session.step_timings  # the session read its owed answers when it closed
    assert len(steps) == NEW_TOKENS and spans == ["0:2", "2:4", "4:6"]
    for step in steps:
        assert not step.pending and [hop.span for hop in step.hops] == spans
        for hop in step.hops:
            assert min(hop.network_s, hop.queue_s, hop.return_s) >= 0 and hop.compute_s > 0
        assert [hop.return_s > 0 for hop in step.hops] == [False, False, True]  # the client waits on the last
    decode = steps[1:]
    ratio = sum(step.critical_path_s for step in decode) / sum(step.step_s for step in decode)
    assert 0.9 <= ratio <= 1.1, [
        (round(s.step_s * 1e3, 2), round(s.critical_path_s * 1e3, 2)) for s in decode
    ]


def test_each_server_s_metrics_count_what_the_client_did(shared):
    """``curl`` of every server's /metrics parses as Prometheus text; one generation moves the steps,
    tokens, pushes, latency histograms and sessions by exactly what the client sent; a refusal is counted
    under its status code."""
    ids, mask = _prompt(2, seed=6)
    before = [scrape(port) for port in shared.metrics_ports]
    with ShardedModel.from_pretrained(shared.model_path, shared.initial_peers) as model:
        with model.inference_session(max_length=64) as session:
            model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert len(session.route) == 3
        steps = session.step_timings
    address = f"127.0.0.1:{shared.online_ports().pop()}"
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.ShardStub(channel).Push(
            pb.PushRequest(push_token=b"guess" * 4, step=pb.Step(step_id=1)), timeout=10
        )
    after = [scrape(port) for port in shared.metrics_ports]
    tokens = sum(2 * step.positions for step in steps)  # batch 2
    for index, (old, new) in enumerate(zip(before, after, strict=True)):
        moved = {name: new.get(name, 0.0) - old.get(name, 0.0) for name in new}
        assert moved["shardnet_server_steps_total"] == len(steps)
        assert moved["shardnet_server_tokens_total"] == tokens
        assert moved["shardnet_server_step_queue_seconds_count"] == len(steps)
        assert moved["shardnet_server_step_compute_seconds_count"] == len(steps)
        pushes = len(steps) if index < 2 else 0
        assert moved["shardnet_server_pushes_total"] == pushes
        assert moved["shardnet_server_step_push_seconds_count"] == pushes
        assert moved["shardnet_server_sessions_served_total"] == 1
        assert new["shardnet_server_decode_batch_rows_count"] > old.get(
            "shardnet_server_decode_batch_rows_count", 0
        )
        assert new['shardnet_server_state{shardnet_server_state="online"}'] == 1
    refused = 'shardnet_server_errors_total{code="FAILED_PRECONDITION",rpc="Push"}'
    assert (
        sum(new.get(refused, 0.0) - old.get(refused, 0.0) for old, new in zip(before, after, strict=True))
        == 1
    )


def scrape(port: int) -> dict[str, float]:
    """``curl`` a server's /metrics, parsed with prometheus_client's parser: sample (with its labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = subprocess.run(
        ["curl", "-sf", f"http://127.0.0.1:{port}/metrics"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
