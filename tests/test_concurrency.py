"""Many users at once on real processes: replicas share the sessions, one model serves many threads,
and a server whose cache is full sends the session elsewhere. Every output equals its solo run."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from shardnet import ShardedModel
from shardnet.dht import start_dht
from shardnet.launch import LocalSwarm
from shardnet.wire import pb, pb_grpc

from .conftest import reference, serving_process

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def replicas(llama_untied, tmp_path_factory):
    """Two replicas of each span."""
    swarm = LocalSwarm(
        llama_untied,
        [(0, 3), (0, 3), (3, 6), (3, 6)],
        log_dir=tmp_path_factory.mktemp("replica_logs"),
        torch_threads=1,
    )
    swarm.start(timeout_s=180)
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def local(llama_untied):
    return reference(llama_untied)


def _prompts(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (1, 3 + index), generator=generator) for index in range(count)]


def _info(address: str) -> pb.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.ShardStub(channel).Info(pb.InfoRequest(), timeout=10)


def test_eight_clients_on_two_replicas_per_span(replicas, local):
    dht = start_dht(
        replicas.initial_peers, client_mode=True, model_id=replicas.model_id, num_blocks=replicas.num_blocks
    )
    models = [ShardedModel.from_pretrained(replicas.model_path, dht=dht) for _ in range(8)]
    try:
        prompts = _prompts(8)

        def generate(model, ids):  # the route is per thread: read it in the thread that generated
            return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), model.last_route

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(generate, models, prompts))
        outputs = [output for output, _ in results]
        peers_used = {hop.peer_id for _, route in results for hop in route}
        servers = {view.record.peer_id: view for views in models[0].swarm.servers() for view in views}
    finally:
        for model in models:
            model.close()
        dht.shutdown()
    for prompt, got in zip(prompts, outputs, strict=True):
        assert got.tolist() == local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    assert len(servers) == 4 and peers_used == set(servers), "some replica got no session"
    for view in servers.values():
        assert _info(view.address).sessions_served >= 1, f"{view.short_id} served no session"


def test_eight_threads_share_one_model(replicas, local):
    prompts = _prompts(8, seed=1)
    with ShardedModel.from_pretrained(replicas.model_path, replicas.initial_peers) as model:
        with ThreadPoolExecutor(8) as pool:
            outputs = list(
                pool.map(lambda ids: model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), prompts)
            )
        with model.inference_session(max_length=32) as mine:  # a session belongs to its thread
            model.generate(prompts[0], max_new_tokens=2)
            with ThreadPoolExecutor(1) as pool:
                other = pool.submit(model.generate, prompts[1], max_new_tokens=NEW_TOKENS).result()
            assert mine.ids.shape[1] == prompts[0].shape[1] + 2
    for prompt, got in zip(prompts, outputs, strict=True):
        assert got.tolist() == local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    assert other.tolist() == outputs[1].tolist()


def test_full_server_refuses_and_the_session_completes_elsewhere(llama_untied, local, tmp_path, caplog):
    """The client's view is stale on purpose (one refresh, then none): it still believes the small
    server has room, opens there, is refused with RESOURCE_EXHAUSTED, and opens on the new server."""
    swarm = LocalSwarm(llama_untied, [(0, 6)], log_dir=tmp_path, torch_threads=1)
    swarm.start_dht()
    small = swarm.start_server(0, 6, ["--max-cache-tokens", "40", "--max-cache-tokens-per-client", "40"])
    try:
        swarm.wait_ready(timeout_s=180)
        with ShardedModel.from_pretrained(llama_untied, swarm.initial_peers, refresh_interval_s=600) as model:
            [(small_view)] = [hop.server for hop in model.route()]
            assert serving_process(swarm, small_view.record.port) is small
            big = swarm.start_server(0, 6)
            swarm.wait_ready(timeout_s=180)
            with grpc.insecure_channel(small_view.address) as channel:
                done = threading.Event()

                def requests():  # open, then keep the stream (and its cache) until the test is done
                    yield pb.InferenceRequest(
                        open=pb.OpenSession(
                            model_id=swarm.model_id, span=pb.Span(start=0, end=6), max_length=30, batch_size=1
                        )
                    )
                    done.wait(60)

                holder = pb_grpc.ShardStub(channel).Inference(requests(), timeout=60)
                assert next(holder).WhichOneof("kind") == "opened"  # 30 of the 40 tokens are taken now
                ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(5))
                with caplog.at_level("INFO", logger="shardnet.client.trust"):
                    got = model.generate(ids, max_new_tokens=20, do_sample=False)  # needs 29 tokens
                done.set()
                holder.cancel()
            [hop] = model.last_route
            assert serving_process(swarm, hop.server.record.port) is big
    finally:
        swarm.stop()
    assert got.tolist() == local.generate(ids, max_new_tokens=20, do_sample=False).tolist()
    assert any("RESOURCE_EXHAUSTED" in r.getMessage() for r in caplog.records), caplog.text


def test_allowed_and_blocked_servers_steer_routes(replicas):
    from shardnet.errors import RouteNotFoundError

    with ShardedModel.from_pretrained(replicas.model_path, replicas.initial_peers) as probe:
        views = {view.record.peer_id: view for views in probe.swarm.servers() for view in views}
    first = sorted(peer for peer, view in views.items() if view.record.start == 0)
    second = sorted(peer for peer, view in views.items() if view.record.start == 3)
    ids = torch.tensor([[5, 6, 7]])
    with ShardedModel.from_pretrained(
        replicas.model_path, replicas.initial_peers, blocked_servers=[first[0]]
    ) as model:
        for _ in range(4):
            model.generate(ids, max_new_tokens=2)
            assert first[0] not in {hop.peer_id for hop in model.last_route}
    with ShardedModel.from_pretrained(
        replicas.model_path, replicas.initial_peers, allowed_servers=[first[1], second[0]]
    ) as model:
        model.generate(ids, max_new_tokens=2)
        assert [hop.peer_id for hop in model.last_route] == [first[1], second[0]]
    with ShardedModel.from_pretrained(
        replicas.model_path, replicas.initial_peers, allowed_servers=first, route_timeout_s=1
    ) as model:
        with pytest.raises(RouteNotFoundError, match=r"3:6.*not in allowed_servers"):
            model.generate(ids, max_new_tokens=2)


def test_eight_sessions_on_one_server_batch_and_each_equals_its_solo_run(llama_untied, local, tmp_path):
    """Eight clients with prompts of 3..17 tokens on one server: their decode steps share forward passes
    (the server counts them), and every output equals the same prompt generated alone."""
    swarm = LocalSwarm(llama_untied, [(0, 6)], log_dir=tmp_path, torch_threads=1)
    swarm.start(timeout_s=180)
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 256, (1, 3 + 2 * index), generator=generator) for index in range(8)]
    try:
        with ShardedModel.from_pretrained(llama_untied, swarm.initial_peers) as model:
            barrier = threading.Barrier(8)

            def generate(ids):
                barrier.wait(timeout=60)  # all eight start together
                return model.generate(ids, max_new_tokens=3 * NEW_TOKENS, do_sample=False)

            with ThreadPoolExecutor(8) as pool:
                outputs = list(pool.map(generate, prompts))
            [hop] = model.route()
            info = _info(hop.server.address)
    finally:
        swarm.stop()
    for prompt, got in zip(prompts, outputs, strict=True):
        want = local.generate(prompt, max_new_tokens=3 * NEW_TOKENS, do_sample=False)
        assert got.tolist() == want.tolist()
    assert info.decode_batches > 0 and info.decode_steps_batched >= 2 * info.decode_batches
    print(f"{info.decode_steps_batched} of {8 * (3 * NEW_TOKENS - 1)} decode steps ran batched")
