"""`shardnet status` on a real swarm: per server load and counts, as one JSON document and as a table."""

from __future__ import annotations

import json
import queue
import time

import grpc
import pytest
import torch

import shardnet
from shardnet.client.swarm_status import render_table
from shardnet.dht import lookup, start_dht
from shardnet.launch import LocalSwarm
from shardnet.wire import pb, pb_grpc

from .conftest import server_view, shardnet_status

SPAN = (0, 4)  # of 6 blocks: 4:6 has no server


@pytest.fixture(scope="module")
def one_server(llama_untied, tmp_path_factory):
    swarm = LocalSwarm(
        llama_untied,
        [SPAN],
        log_dir=tmp_path_factory.mktemp("status_logs"),
        torch_threads=1,
        extra_args=["--announce-ttl", "3"],  # refreshed every second: small load changes show quickly
    )
    swarm.start(timeout_s=180)
    dht = start_dht(swarm.initial_peers, client_mode=True)
    yield swarm, dht
    dht.shutdown()
    swarm.stop()


def test_status_json_and_table_show_load_and_counts(one_server):
    swarm, dht = one_server
    [view] = lookup(dht, swarm.model_id, swarm.num_blocks)[SPAN[0]]
    channel = grpc.insecure_channel(view.address)
    requests: queue.SimpleQueue = queue.SimpleQueue()
    responses = pb_grpc.ShardStub(channel).Inference(iter(requests.get, None), timeout=120)
    try:
        opened = pb.OpenSession(
            model_id=swarm.model_id, span=pb.Span(start=0, end=4), max_length=64, batch_size=2
        )
        requests.put(pb.InferenceRequest(open=opened))
        next(responses)
        deadline = time.monotonic() + 60
        while lookup(dht, swarm.model_id, swarm.num_blocks)[0][0].record.open_sessions != 1:
            assert time.monotonic() < deadline, "the open session never reached the DHT record"
            time.sleep(0.2)

        document = json.loads(shardnet_status(swarm, "--json"))
        assert document["model_id"] == swarm.model_id and document["num_blocks"] == 6
        assert document["architecture"] == "llama"
        assert document["blocks_without_online_server"] == [4, 5]
        [server] = document["servers"]
        assert server["peer_id"] == view.record.peer_id and server["address"] == view.address
        assert (server["span"], server["state"], server["dtype"]) == ("0:4", "online", "float32")
        assert server["throughput"] > 0
        assert server["cache_tokens_total"] == 131072
        assert server["cache_tokens_free"] == 131072 - 2 * 64
        assert (server["open_sessions"], server["sessions_served"]) == (1, 1)
        assert server["shardnet_version"] == shardnet.__version__  # what the server announced it runs

        # The table form (the CLI's default; tests/test_dht.py runs it) renders the same look-up.
        table = render_table(lookup(dht, swarm.model_id, swarm.num_blocks), swarm.model_id, 6, "llama")
        assert table.startswith(f"model {swarm.model_id} (architecture llama): 6 blocks, 1 servers")
        assert "1 servers" in table and "open" in table and "served" in table
        assert "blocks with no online server: 4:6" in table
        [row] = [line for line in table.splitlines() if view.address in line]
        assert row.split()[2:4] == ["0:4", "online"]
        # open, served, version, tls, weights (its digests announced, none differing: one holder)
        assert row.split()[-5:] == ["1", "1", shardnet.__version__, "no", "ok"]
        assert len(server["weight_digests"]) == 4 and all(len(d) == 8 for d in server["weight_digests"])
        assert server["weights"] == "ok"
    finally:
        requests.put(None)
        responses.cancel()
        channel.close()


def test_status_document_lists_each_server_once_with_its_freshest_record():
    from shardnet.client.swarm_status import status_document

    old = server_view("peerA", 0, 2, open_sessions=1, expiration=100.0)
    new = server_view("peerA", 0, 2, open_sessions=3, sessions_served=7, expiration=110.0)
    draining = server_view("peerB", 2, 3, state="draining")
    document = status_document([[old], [new], [draining]], "llama_x", 4, "llama")
    assert document["architecture"] == "llama"
    assert [s["peer_id"] for s in document["servers"]] == ["peerA", "peerB"]
    assert (document["servers"][0]["open_sessions"], document["servers"][0]["sessions_served"]) == (3, 7)
    assert document["blocks_without_online_server"] == [2, 3]  # draining is not online; 3 has nobody
    json.dumps(document)  # plain JSON types only


def test_prefix_hits_show_in_info_and_status(one_server):
    """Two sessions on one connection send the same 2.5 blocks of hidden states: the second reuses 2."""
    from shardnet.server.prefix_reuse import BLOCK_TOKENS
    from shardnet.wire.tensors import serialize

    swarm, dht = one_server
    [view] = lookup(dht, swarm.model_id, swarm.num_blocks)[SPAN[0]]
    hidden = torch.randn(1, 2 * BLOCK_TOKENS + 16, 64, generator=torch.Generator().manual_seed(5))
    channel = grpc.insecure_channel(view.address)
    stub = pb_grpc.ShardStub(channel)
    outputs = []
    try:
        for _ in range(2):
            opened = pb.OpenSession(
                model_id=swarm.model_id, span=pb.Span(start=0, end=4), max_length=128, batch_size=1
            )
            step = pb.Step(step_id=1, hidden_states=serialize(hidden))
            replies = list(
                stub.Inference(
                    iter([pb.InferenceRequest(open=opened), pb.InferenceRequest(step=step)]), timeout=60
                )
            )
            outputs.append(replies[1].step.hidden_states.SerializeToString())
        info = stub.Info(pb.InfoRequest(), timeout=10)
    finally:
        channel.close()
    assert outputs[0] == outputs[1]  # the kept positions come back as kept, the rest computed the same
    assert (info.prefix_hits, info.prefix_tokens_reused) == (1, 2 * BLOCK_TOKENS)
    assert (info.prefix_cache_tokens_used, info.prefix_cache_tokens_total) == (2 * BLOCK_TOKENS, 131072 // 8)
    deadline = time.monotonic() + 60
    while True:  # the record is refreshed every second (--announce-ttl 3)
        [server] = json.loads(shardnet_status(swarm, "--json"))["servers"]
        if server["prefix_hits"] == 1:
            break
        assert time.monotonic() < deadline, "the prefix hit never reached the DHT record"
        time.sleep(0.5)
    assert server["prefix_tokens_reused"] == 2 * BLOCK_TOKENS


def test_status_tells_a_server_whose_weights_differ_from_most_holders():
    from shardnet.client.swarm_status import status_document

    honest = ["0a0a0a0a", "1b1b1b1b"]
    a = server_view("peerA", 0, 2, weight_digests=honest)
    b = server_view("peerB", 0, 2, weight_digests=honest)
    odd = server_view("peerC", 1, 3, weight_digests=["ffffffff", "2c2c2c2c"])  # block 1 differs
    bf16 = server_view("peerD", 0, 1, dtype="bfloat16", weight_digests=["99999999"])  # another dtype
    silent = server_view("peerE", 2, 3)  # an older server: no digests
    document = status_document([[a, b, bf16], [a, b, odd], [odd, silent]], "llama_x", 3, "llama")
    weights = {s["peer_id"]: s["weights"] for s in document["servers"]}
    assert weights == {"peerA": "ok", "peerB": "ok", "peerC": "differs", "peerD": "ok", "peerE": "-"}
    tie = status_document([[a], [a, odd]], "llama_x", 3, "llama")  # one against one: nobody to believe
    assert {s["peer_id"]: s["weights"] for s in tie["servers"]} == {"peerA": "ok", "peerC": "ok"}


def test_weight_digests_are_stable_and_tell_a_changed_weight(llama_untied):
    from transformers import AutoConfig

    from shardnet.models import adapter_for
    from shardnet.models.checkpoint import Checkpoint
    from shardnet.server.weight_identity import span_digests

    config = AutoConfig.from_pretrained(llama_untied)
    load = lambda: adapter_for(config).load_span(Checkpoint(llama_untied), config, 1, 4, torch.float32)  # noqa: E731
    first, again = load(), load()
    assert span_digests(first.blocks) == span_digests(again.blocks)
    with torch.no_grad():
        next(again.blocks[1].parameters()).view(-1)[0] += 1e-3
    changed = span_digests(again.blocks)
    assert changed[0] == span_digests(first.blocks)[0] and changed[2] == span_digests(first.blocks)[2]
    assert changed[1] != span_digests(first.blocks)[1]
    half = adapter_for(config).load_span(Checkpoint(llama_untied), config, 1, 4, torch.bfloat16)
    assert span_digests(half.blocks) != span_digests(first.blocks)  # a digest is of the weights as loaded
