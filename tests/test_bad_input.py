"""A server refuses bad requests with the exact status code and keeps serving everyone else."""

from __future__ import annotations

import queue

import grpc
import pytest
import torch

from shardnet.launch import LocalSwarm
from shardnet.wire import pb, pb_grpc
from shardnet.wire.tensors import serialize

HIDDEN = 64


@pytest.fixture(scope="module")
def server(llama_untied, tmp_path_factory):
    """One server for blocks 1:4 with small limits, so the limits are reachable in a test."""
    swarm = LocalSwarm(
        llama_untied,
        [(1, 4)],
        log_dir=tmp_path_factory.mktemp("bad_input_logs"),
        torch_threads=1,
        extra_args=[
            "--max-message-mb",
            "1",
            "--max-cache-tokens",
            "256",
            "--max-batch-size",
            "4",
            "--max-length",
            "128",
            # the whole budget to one client here; the per-client shares have their own test below
            "--max-cache-tokens-per-client",
            "256",
        ],
    )
    swarm.start(timeout_s=120)
    from shardnet.dht import lookup, start_dht

    dht = start_dht(swarm.initial_peers, client_mode=True)
    [view] = lookup(dht, swarm.model_id, swarm.num_blocks)[1]
    dht.shutdown()
    channel = grpc.insecure_channel(view.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield swarm, pb_grpc.ShardStub(channel)
    channel.close()
    swarm.stop()


def _forward(swarm, hidden, **fields) -> pb.ForwardRequest:
    request = dict(model_id=swarm.model_id, span=pb.Span(start=1, end=4), hidden_states=serialize(hidden))
    request.update(fields)
    return pb.ForwardRequest(**request)


def _assert_still_serves(swarm, stub) -> None:
    reply = stub.Forward(_forward(swarm, torch.randn(1, 3, HIDDEN)), timeout=30)
    assert list(reply.hidden_states.shape) == [1, 3, HIDDEN]


def _status(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


BAD_FORWARDS = {
    "wrong_hidden_size": lambda s: _forward(s, torch.randn(1, 3, HIDDEN + 1)),
    "two_dims": lambda s: _forward(s, torch.randn(3, HIDDEN)),
    "int_hidden": lambda s: _forward(s, torch.ones(1, 3, HIDDEN, dtype=torch.int64)),
    "short_data": lambda s: _forward(
        s,
        torch.randn(1, 3, HIDDEN),
        hidden_states=pb.Tensor(dtype="float32", shape=[1, 3, HIDDEN], data=b"\0" * 10),
    ),
    "unknown_dtype": lambda s: _forward(
        s, torch.randn(1, 3, HIDDEN), hidden_states=pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8)
    ),
    "span_outside": lambda s: _forward(s, torch.randn(1, 3, HIDDEN), span=pb.Span(start=0, end=4)),
    "empty_span": lambda s: _forward(s, torch.randn(1, 3, HIDDEN), span=pb.Span(start=2, end=2)),
    "batch_too_big": lambda s: _forward(s, torch.randn(5, 3, HIDDEN)),
    "mask_shape": lambda s: _forward(
        s, torch.randn(1, 3, HIDDEN), attention_mask=serialize(torch.ones(1, 4, dtype=torch.int64))
    ),
    "mask_values": lambda s: _forward(
        s, torch.randn(1, 3, HIDDEN), attention_mask=serialize(torch.full((1, 3), 7))
    ),
    "negative_positions": lambda s: _forward(
        s, torch.randn(1, 3, HIDDEN), position_ids=serialize(torch.tensor([[-1, 0, 1]]))
    ),
    "positions_too_far": lambda s: _forward(
        s, torch.randn(1, 3, HIDDEN), position_ids=serialize(torch.tensor([[0, 1, 100000]]))
    ),
    # NaN and Inf are refused, not passed through (README "what you expose")
    "nan_hidden": lambda s: _forward(
        s, torch.randn(1, 3, HIDDEN).index_fill(2, torch.tensor([5]), float("nan"))
    ),
    "inf_bfloat16_hidden": lambda s: _forward(
        s, torch.randn(1, 3, HIDDEN).index_fill(1, torch.tensor([2]), float("-inf")).to(torch.bfloat16)
    ),
}


@pytest.mark.parametrize("case", list(BAD_FORWARDS))
def test_bad_forward_is_invalid_argument_and_server_keeps_serving(server, case):
    swarm, stub = server
    assert (
        _status(lambda: stub.Forward(BAD_FORWARDS[case](swarm), timeout=30))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    _assert_still_serves(swarm, stub)


def test_other_model_is_failed_precondition(server):
    swarm, stub = server
    request = _forward(swarm, torch.randn(1, 3, HIDDEN), model_id="llama_000000000000")
    assert _status(lambda: stub.Forward(request, timeout=30)) == grpc.StatusCode.FAILED_PRECONDITION
    _assert_still_serves(swarm, stub)


def test_oversized_message_is_resource_exhausted(server):
    swarm, stub = server
    big = torch.randn(4, 1200, HIDDEN)  # ~1.2 MiB, over the server's 1 MiB limit
    assert (
        _status(lambda: stub.Forward(_forward(swarm, big), timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    _assert_still_serves(swarm, stub)


class _Stream:
    def __init__(self, stub):
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.responses = stub.Inference(iter(self.requests.get, None), timeout=30)

    def send(self, **kind) -> pb.InferenceResponse:
        self.requests.put(pb.InferenceRequest(**kind))
        return next(self.responses)

    def close(self):
        self.requests.put(None)
        self.responses.cancel()


def _open(swarm, batch=1, max_length=16, model_id=None) -> dict:
    return dict(
        open=pb.OpenSession(
            model_id=model_id or swarm.model_id,
            span=pb.Span(start=1, end=4),
            max_length=max_length,
            batch_size=batch,
        )
    )


def _step(position, hidden) -> dict:
    return dict(step=pb.Step(step_id=1, position=position, hidden_states=serialize(hidden)))


def _stream_status(stub, *messages) -> grpc.StatusCode | None:
    stream = _Stream(stub)
    try:
        for message in messages:
            stream.send(**message)
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        stream.close()
    return None


def test_step_before_open_is_failed_precondition(server):
    swarm, stub = server
    assert _stream_status(stub, _step(0, torch.randn(1, 1, HIDDEN))) == grpc.StatusCode.FAILED_PRECONDITION
    _assert_still_serves(swarm, stub)


def test_wrong_position_is_failed_precondition(server):
    swarm, stub = server
    code = _stream_status(stub, _open(swarm), _step(5, torch.randn(1, 1, HIDDEN)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_position_ahead_of_the_cache_is_failed_precondition(server):
    """A step may roll the cache back (position below the server's count), never skip ahead."""
    swarm, stub = server
    first = _step(0, torch.randn(1, 2, HIDDEN))
    code = _stream_status(
        stub, _open(swarm), first, _step(1, torch.randn(1, 1, HIDDEN)), _step(4, torch.randn(1, 1, HIDDEN))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    _assert_still_serves(swarm, stub)


@pytest.mark.parametrize(
    "rows",
    [
        torch.tensor([0, 1, 2]),
        torch.tensor([0, 2]),
        torch.tensor([-1, 0]),
        torch.tensor([[0, 1]]),
        torch.tensor([0.0, 1.0]),
    ],
    ids=["too_many", "out_of_range", "negative", "two_dims", "float"],
)
def test_bad_hypo_ids_are_invalid_argument(server, rows):
    swarm, stub = server
    step = pb.Step(
        step_id=2, position=1, hidden_states=serialize(torch.randn(2, 1, HIDDEN)), hypo_ids=serialize(rows)
    )
    code = _stream_status(stub, _open(swarm, batch=2), _step(0, torch.randn(2, 1, HIDDEN)), dict(step=step))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    _assert_still_serves(swarm, stub)


def test_step_past_max_length_is_invalid_argument(server):
    swarm, stub = server
    code = _stream_status(stub, _open(swarm, max_length=4), _step(0, torch.randn(1, 5, HIDDEN)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_session_too_long_for_server_is_invalid_argument(server):
    swarm, stub = server
    assert _stream_status(stub, _open(swarm, max_length=129)) == grpc.StatusCode.INVALID_ARGUMENT


def test_cache_budget_is_resource_exhausted_and_freed_on_close(server):
    swarm, stub = server
    holder = _Stream(stub)
    holder.send(**_open(swarm, batch=2, max_length=100))  # 200 of 256 cache tokens
    try:
        assert (
            _stream_status(stub, _open(swarm, batch=1, max_length=100)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        reply = holder.send(**_step(0, torch.randn(2, 3, HIDDEN)))  # the open session is unaffected
        assert list(reply.step.hidden_states.shape) == [2, 3, HIDDEN]
    finally:
        holder.close()
    for _ in range(50):  # the server frees the cache when the stream ends
        if stub.Info(pb.InfoRequest(), timeout=10).cache_tokens_free == 256:
            break
        import time

        time.sleep(0.1)
    assert stub.Info(pb.InfoRequest(), timeout=10).cache_tokens_free == 256
    assert (
        _stream_status(stub, _open(swarm, batch=1, max_length=100), _step(0, torch.randn(1, 1, HIDDEN)))
        is None
    )


def test_info_reports_span_and_limits(server):
    swarm, stub = server
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert (info.model_id, info.span.start, info.span.end) == (swarm.model_id, 1, 4)
    assert info.protocol_version == "shardnet.v1" and info.dtype == "float32"
    assert info.max_message_bytes == 1 << 20 and info.max_batch_size == 4 and info.max_length == 128


def test_one_client_gets_half_the_cache_and_half_the_sessions_by_default(llama_untied, tmp_path):
    """Per-client quotas (one connection = one client): the first client's third session, or a session
    past its half of the cache, is RESOURCE_EXHAUSTED while another client still opens one."""
    swarm = LocalSwarm(
        llama_untied,
        [(1, 4)],
        log_dir=tmp_path,
        torch_threads=1,
        extra_args=["--max-cache-tokens", "256", "--max-sessions", "4"],
    )
    swarm.start(timeout_s=120)
    from shardnet.dht import lookup

    [view] = lookup(swarm._probe, swarm.model_id, swarm.num_blocks)[1]
    # A channel pool of its own each, so the two clients do not share one connection.
    channels = [
        grpc.insecure_channel(view.address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(2)
    ]
    first, second = (pb_grpc.ShardStub(channel) for channel in channels)
    streams = []
    try:
        streams.append(_Stream(first))
        streams[-1].send(**_open(swarm, batch=1, max_length=100))  # 100 of the first client's 128
        with pytest.raises(grpc.RpcError) as refused:
            _Stream(first).send(**_open(swarm, batch=1, max_length=64))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-cache-tokens-per-client" in refused.value.details()
        streams.append(_Stream(first))
        streams[-1].send(**_open(swarm, batch=1, max_length=20))  # its second session: 120 of 128
        with pytest.raises(grpc.RpcError) as refused:
            _Stream(first).send(**_open(swarm, batch=1, max_length=4))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-sessions-per-client" in refused.value.details()
        streams.append(_Stream(second))
        reply = streams[-1].send(**_open(swarm, batch=1, max_length=100))  # the other client is served
        assert reply.opened.cache_tokens == 100
    finally:
        for stream in streams:
            stream.close()
        for channel in channels:
            channel.close()
        swarm.stop()


def test_a_flood_of_calls_is_resource_exhausted_then_served_again(llama_untied, tmp_path):
    swarm = LocalSwarm(
        llama_untied, [(1, 4)], log_dir=tmp_path, torch_threads=1, extra_args=["--max-requests-per-s", "5"]
    )
    swarm.start(timeout_s=120)
    from shardnet.dht import lookup

    [view] = lookup(swarm._probe, swarm.model_id, swarm.num_blocks)[1]
    try:
        with grpc.insecure_channel(view.address) as channel:
            stub = pb_grpc.ShardStub(channel)
            codes = []
            for _ in range(30):  # bursts of 10 allowed, then 5 a second
                try:
                    stub.Info(pb.InfoRequest(), timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    assert "request rate" in exc.details()
            assert codes[:10] == [grpc.StatusCode.OK] * 10
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 15
            import time

            time.sleep(1.0)
            stub.Info(pb.InfoRequest(), timeout=10)  # refilled
    finally:
        swarm.stop()


@pytest.mark.slow  # the default suite must stay under 10 minutes: README "Tests" says what covers it
def test_a_20_mib_prefill_goes_through_with_the_default_limits(tmp_path):
    """A 2048-token prefill of a 13B-class model is 20 MiB in float16 (hidden 5120). Here the same bytes:
    4 x 2048 positions of hidden 640 in float32 (20 MiB each way) through a server with default flags."""
    from shardnet import ShardedModel

    from .conftest import make_llama, reference

    path = make_llama(
        tmp_path / "wide",
        hidden_size=640,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=10,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    swarm = LocalSwarm(path, [(0, 2)], log_dir=tmp_path, torch_threads=1)
    swarm.start(timeout_s=120)
    try:
        ids = torch.randint(3, 256, (4, 2048), generator=torch.Generator().manual_seed(2))
        assert 4 * 2048 * 640 * 4 == 20 << 20
        with ShardedModel.from_pretrained(path, swarm.initial_peers, max_retries=0) as model, torch.no_grad():
            got = model(ids).logits
            want = reference(path)(ids).logits
        assert (got - want).abs().max().item() <= 1e-3
    finally:
        swarm.stop()
