"""A draining server (SIGTERM) hands each open session's KV cache to another holder of its blocks: the
generation goes on there exactly, with nothing replayed."""

from __future__ import annotations

import signal

import grpc
import pytest
import torch

from shardnet import ShardedModel
from shardnet.client.trust import ServerTrust
from shardnet.wire import pb, pb_grpc
from shardnet.wire.tensors import serialize

from .conftest import OnToken, prompt, reference, serving_process

NEW_TOKENS = 30
DRAIN_AT = 6


@pytest.fixture(scope="module")
def local(llama_untied):
    return reference(llama_untied)


@pytest.mark.parametrize(
    ("hop", "push", "batch"),
    [(0, True, 1), (1, True, 2), (0, False, 2)],
    ids=["first_hop_push", "last_hop_push_batch2", "first_hop_chained_batch2"],
)
def test_a_draining_server_hands_its_session_over_and_nothing_is_replayed(replicas, local, hop, push, batch):
    ids, mask = prompt(batch, seed=hop + 10 * batch, pad=3)
    want = local.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    health = ServerTrust.shared()
    drained = []
    with ShardedModel.from_pretrained(replicas.model_path, replicas.initial_peers, push=push) as model:
        with model.inference_session(max_length=64) as session:

            def drain() -> None:
                record = session.route[hop].server.record
                process = serving_process(replicas, record.port)
                process.send_signal(signal.SIGTERM)
                drained.append((process, record.peer_id, (record.start, record.end)))

            before = health.counts()
            got = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                streamer=OnToken(DRAIN_AT, drain),
            )
            [(process, drained_peer, span)] = drained
            assert drained_peer not in [route_hop.peer_id for route_hop in session.route]
            assert session.chain.handoffs == 1 and session.chain.failovers == 0
    after = health.counts()
    assert got.tolist() == want.tolist()
    assert after.get("handoffs", 0) - before.get("handoffs", 0) == 1
    assert after.get("replays", 0) == before.get("replays", 0)
    assert process.wait(timeout=30) == 0  # its only session left: the drain ended at once
    replicas.start_server(*span)
    replicas.wait_ready(timeout_s=120)


def test_a_handed_over_session_is_checked_before_it_is_adopted(replicas):
    """Adopt trusts nothing: another dtype, a layer outside the span, or a missing layer is refused;
    an adoption token nobody handed over opens nothing."""
    address = f"127.0.0.1:{sorted(replicas.online_ports())[0]}"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ShardStub(channel)
        info = stub.Info(pb.InfoRequest(), timeout=10)
        opened = pb.OpenSession(model_id=replicas.model_id, span=info.span, max_length=8, batch_size=1)
        layer = torch.zeros(1, 2, 3, 8)
        cases = {
            "float16": dict(keys=torch.zeros(1, 2, 3, 8, dtype=torch.float16), layer=info.span.start),
            "outside": dict(keys=layer, layer=info.span.end + 1),
            "missing layers": dict(keys=layer, layer=info.span.start),
        }
        for name, case in cases.items():
            request = pb.AdoptRequest(open=opened, position=3, layer=case["layer"], seen=3)
            request.keys.CopyFrom(serialize(case["keys"]))
            request.values.CopyFrom(serialize(layer))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Adopt(iter([request]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        with pytest.raises(grpc.RpcError) as unknown:
            list(
                stub.Inference(
                    iter(
                        [pb.InferenceRequest(open=pb.OpenSession(**_fields(opened), adopt_token=b"x" * 16))]
                    ),
                    timeout=10,
                )
            )
        assert unknown.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


def _fields(message) -> dict:
    return {descriptor.name: value for descriptor, value in message.ListFields()}
