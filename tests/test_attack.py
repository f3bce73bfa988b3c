"""Attack a real server process: hostile requests get their exact status, and the server stays exact.

``test_hostile_requests_*`` sends a fixed catalogue of hostile requests (random bytes as messages,
wrong dtypes and shapes, negative and huge positions, truncated tensors, NaN, steps on closed sessions,
blocks the server does not hold, a foreign model, floods of session opens, streams left half-open,
oversized messages) and asserts each one's status code. ``test_fuzzed_*`` lets hypothesis generate a
few thousand more (``FUZZ_EXAMPLES`` per run; ``pytest -m fuzz`` runs ``LONG_FUZZ_EXAMPLES``, for
before a release) and asserts that none gets INTERNAL or UNKNOWN. After each, the server must still
generate exactly what local transformers does, hold no leftover sessions, and have its memory back
near where it stood after warming up. The counts go to the log (``-o log_cli=true`` shows them).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import time

import grpc
import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardnet import ShardedModel
from shardnet.dht import lookup
from shardnet.launch import LocalSwarm
from shardnet.wire import pb, pb_grpc
from shardnet.wire.tensors import serialize

from .conftest import reference

logger = logging.getLogger(__name__)
HIDDEN, BLOCKS = 64, 6
MAX_MESSAGE_MB = 2
IDLE_TIMEOUT_S = 2.0
MAX_SESSIONS = 16  # so one client may hold 8
FUZZ_EXAMPLES = int(os.environ.get("SHARDNET_FUZZ_EXAMPLES", "600"))
LONG_FUZZ_EXAMPLES = int(os.environ.get("SHARDNET_LONG_FUZZ_EXAMPLES", "50000"))
MEMORY_SLACK_MIB = 48  # RSS may stay this far above where it stood after the warm-up
C = grpc.StatusCode
# What a hostile request may get. INTERNAL or UNKNOWN would be the server's own failure.
REFUSALS = {C.INVALID_ARGUMENT, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED, C.NOT_FOUND}


@pytest.fixture(scope="module")
def target(llama_untied, tmp_path_factory):
    """One server holding every block, with small limits so that each one can be reached."""
    swarm = LocalSwarm(
        llama_untied,
        [(0, BLOCKS)],
        log_dir=tmp_path_factory.mktemp("attack_logs"),
        torch_threads=1,
        extra_args=[
            "--max-message-mb", str(MAX_MESSAGE_MB),
            "--max-sessions", str(MAX_SESSIONS),
            "--max-length", "256",
            "--max-batch-size", "4",
            "--session-idle-timeout", str(IDLE_TIMEOUT_S),
            "--max-requests-per-s", "100000",  # the rate limit has its own test (test_bad_input.py)
        ],
    )  # fmt: skip
    swarm.start(timeout_s=120)
    [view] = lookup(swarm._probe, swarm.model_id, swarm.num_blocks)[0]
    channel = grpc.insecure_channel(view.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield swarm, channel, psutil.Process(swarm.servers[0].pid)
    channel.close()
    swarm.stop()


@pytest.fixture(scope="module")
def local(llama_untied):
    return reference(llama_untied)


def _generate_exactly(swarm: LocalSwarm, local, seed: int) -> None:
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(seed))
    expected = local.generate(ids, max_new_tokens=8, do_sample=False)
    model = ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers, max_retries=0)
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)
    finally:
        model.close()


def _settled(stub, process: psutil.Process, baseline_rss: int) -> None:
    """No session left open (half-open streams reclaimed), the whole cache free, memory near baseline."""
    deadline = time.monotonic() + 4 * IDLE_TIMEOUT_S + 10
    while True:
        info = stub.Info(pb.InfoRequest(), timeout=10)
        if info.open_sessions == 0 and info.cache_tokens_free == info.cache_tokens_total:
            break
        assert time.monotonic() < deadline, f"{info.open_sessions} sessions still open"
        time.sleep(0.2)
    grown_mib = (process.memory_info().rss - baseline_rss) / (1 << 20)
    logger.info("server RSS %.1f MiB above its warmed-up baseline", grown_mib)
    assert grown_mib < MEMORY_SLACK_MIB


# ---- raw calls: bytes in, a status code out ----


def _raw_unary(channel, method: str, data: bytes) -> C:
    call = channel.unary_unary(f"/shardnet.v1.Shard/{method}")  # no serializers: bytes as they are
    try:
        call(data, timeout=30)
        return C.OK
    except grpc.RpcError as exc:
        return exc.code()


def _stream(channel, messages: list[bytes], hold: bool = False):
    """Send ``messages`` on one Inference stream and read every reply; the stream's final status.
    ``hold``: leave the stream open afterwards (half-open) and return it."""
    call = channel.stream_stream("/shardnet.v1.Shard/Inference")
    requests: queue.SimpleQueue = queue.SimpleQueue()
    for message in messages:
        requests.put(message)
    if not hold:
        requests.put(None)
    replies = call(iter(requests.get, None), timeout=30)
    if hold:
        next(replies)  # the session is open; never send another message nor cancel
        return replies
    try:
        for _ in replies:
            pass
        return C.OK
    except grpc.RpcError as exc:
        return exc.code()


def _open(swarm, start=0, end=BLOCKS, batch=1, max_length=16, model_id=None) -> bytes:
    opened = pb.OpenSession(
        model_id=swarm.model_id if model_id is None else model_id,
        span=pb.Span(start=start, end=end),
        max_length=max_length,
        batch_size=batch,
    )
    return pb.InferenceRequest(open=opened).SerializeToString()


def _step(hidden=None, position=0, **fields) -> bytes:
    hidden = torch.randn(1, 1, HIDDEN) if hidden is None else hidden
    step = pb.Step(step_id=1, position=position, hidden_states=serialize(hidden), **fields)
    return pb.InferenceRequest(step=step).SerializeToString()


def _forward(swarm, hidden=None, **fields) -> bytes:
    request = dict(
        model_id=swarm.model_id,
        span=pb.Span(start=0, end=BLOCKS),
        hidden_states=serialize(torch.randn(1, 3, HIDDEN) if hidden is None else hidden),
    )
    request.update(fields)
    return pb.ForwardRequest(**request).SerializeToString()


def _catalogue(swarm, channel) -> list[tuple[str, callable, C]]:
    """(name, call returning a status, the status it must get)."""
    bad_tensor = pb.Tensor(dtype="float32", shape=[1, 3, HIDDEN], data=b"\0" * 100)
    nan = torch.randn(1, 3, HIDDEN)
    nan[0, 1, 7] = float("nan")
    big = torch.randn(4, MAX_MESSAGE_MB * 1024 * 1024 // (4 * HIDDEN * 4) + 8, HIDDEN)  # over the limit
    cases = []
    random = torch.Generator().manual_seed(0)
    for method in ("Info", "Forward", "Push"):
        for size in (1, 7, 64, 1000):
            data = bytes(torch.randint(0, 256, (size,), generator=random, dtype=torch.uint8).tolist())
            cases.append(
                (f"random {size} bytes to {method}", lambda m=method, d=data: _raw_unary(channel, m, d), None)
            )
    for size in (1, 7, 64, 1000):
        data = bytes(torch.randint(0, 256, (size,), generator=random, dtype=torch.uint8).tolist())
        cases.append((f"random {size} bytes on a stream", lambda d=data: _stream(channel, [d]), None))
    unary = [
        ("hidden of int64", _forward(swarm, torch.ones(1, 3, HIDDEN, dtype=torch.int64)), C.INVALID_ARGUMENT),
        ("hidden of dtype float64", _forward(swarm, hidden_states=pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8)), C.INVALID_ARGUMENT),
        ("hidden of 2 dims", _forward(swarm, torch.randn(3, HIDDEN)), C.INVALID_ARGUMENT),
        ("hidden of 9 dims", _forward(swarm, hidden_states=pb.Tensor(dtype="float32", shape=[1] * 9, data=b"\0" * 4)), C.INVALID_ARGUMENT),
        ("wrong hidden size", _forward(swarm, torch.randn(1, 3, HIDDEN + 1)), C.INVALID_ARGUMENT),
        ("negative dimension", _forward(swarm, hidden_states=pb.Tensor(dtype="float32", shape=[1, -3, HIDDEN], data=b"")), C.INVALID_ARGUMENT),
        ("huge dimensions", _forward(swarm, hidden_states=pb.Tensor(dtype="float32", shape=[1 << 40, 1 << 40, HIDDEN], data=b"\0" * 4)), C.INVALID_ARGUMENT),
        ("no elements but huge dimensions", _forward(swarm, hidden_states=pb.Tensor(dtype="float32", shape=[6890427, 3100095, 446506, 1445, 0], data=b"")), C.INVALID_ARGUMENT),
        ("truncated tensor", _forward(swarm, hidden_states=bad_tensor), C.INVALID_ARGUMENT),
        ("NaN in hidden states", _forward(swarm, nan), C.INVALID_ARGUMENT),
        ("negative positions", _forward(swarm, position_ids=serialize(torch.tensor([[-5, 0, 1]]))), C.INVALID_ARGUMENT),
        ("huge positions", _forward(swarm, position_ids=serialize(torch.tensor([[0, 1, 1 << 62]]))), C.INVALID_ARGUMENT),
        ("mask of 7s", _forward(swarm, attention_mask=serialize(torch.full((1, 3), 7))), C.INVALID_ARGUMENT),
        ("blocks not held", _forward(swarm, span=pb.Span(start=2, end=BLOCKS + 3)), C.INVALID_ARGUMENT),
        ("reversed span", _forward(swarm, span=pb.Span(start=4, end=1)), C.INVALID_ARGUMENT),
        ("foreign model", _forward(swarm, model_id="llama_000000000000"), C.FAILED_PRECONDITION),
        ("empty Forward (no model id)", b"", C.FAILED_PRECONDITION),
        ("oversized message", _forward(swarm, big), C.RESOURCE_EXHAUSTED),
        ("push with an unknown token", pb.PushRequest(push_token=os.urandom(16), step=pb.Step(step_id=1)).SerializeToString(), C.FAILED_PRECONDITION),
    ]  # fmt: skip
    for name, data, code in unary:
        method = "Push" if name.startswith("push") else "Forward"
        cases.append((name, lambda m=method, d=data: _raw_unary(channel, m, d), code))
    streams = [
        ("step before open", [_step()], C.FAILED_PRECONDITION),
        ("two opens", [_open(swarm), _open(swarm)], C.FAILED_PRECONDITION),
        ("open on blocks not held", [_open(swarm, 0, BLOCKS + 1)], C.INVALID_ARGUMENT),
        ("open for a foreign model", [_open(swarm, model_id="gpt2_000000000000")], C.FAILED_PRECONDITION),
        ("open of batch 0", [_open(swarm, batch=0)], C.INVALID_ARGUMENT),
        ("open of batch 2^32-1", [_open(swarm, batch=(1 << 32) - 1)], C.INVALID_ARGUMENT),
        ("open longer than the server allows", [_open(swarm, max_length=1 << 31)], C.INVALID_ARGUMENT),
        ("step at a huge position", [_open(swarm), _step(position=(1 << 32) - 1)], C.FAILED_PRECONDITION),
        ("step past max_length", [_open(swarm, max_length=4), _step(torch.randn(1, 5, HIDDEN))], C.INVALID_ARGUMENT),
        ("step of the wrong batch", [_open(swarm), _step(torch.randn(3, 1, HIDDEN))], C.INVALID_ARGUMENT),
        ("step of bfloat16 Inf", [_open(swarm), _step(torch.full((1, 1, HIDDEN), float("inf")).to(torch.bfloat16))], C.INVALID_ARGUMENT),
        ("step with negative hypo_ids", [_open(swarm), _step(), _step(position=1, hypo_ids=serialize(torch.tensor([-1])))], C.INVALID_ARGUMENT),
        ("empty request on a stream", [_open(swarm), pb.InferenceRequest().SerializeToString()], C.INVALID_ARGUMENT),
        ("oversized step", [_open(swarm, batch=4, max_length=256), _step(torch.randn(4, 256, HIDDEN * 10))], C.RESOURCE_EXHAUSTED),
    ]  # fmt: skip
    for name, messages, code in streams:
        cases.append((name, lambda m=messages: _stream(channel, m), code))
    return cases


def _flood_and_half_open(swarm, channel) -> collections.Counter:
    """Open sessions on one connection until refused and leave them half-open; they must be reclaimed."""
    codes: collections.Counter = collections.Counter()
    held = []
    for _ in range(MAX_SESSIONS):
        try:
            held.append(_stream(channel, [_open(swarm)], hold=True))
            codes[C.OK] += 1
        except grpc.RpcError as exc:
            codes[exc.code()] += 1
    assert codes[C.OK] == MAX_SESSIONS // 2  # the per-client share; the rest RESOURCE_EXHAUSTED
    assert codes[C.RESOURCE_EXHAUSTED] == MAX_SESSIONS - MAX_SESSIONS // 2
    return codes  # the held streams go with this frame's references; the server reclaims them when idle


def test_hostile_requests_get_exact_statuses_and_the_server_stays_exact(target, local):
    swarm, channel, process = target
    stub = pb_grpc.ShardStub(channel)
    for seed in range(3):  # warm up: caches, allocator, compiled paths
        _generate_exactly(swarm, local, seed)
    baseline = process.memory_info().rss
    codes: collections.Counter = collections.Counter()
    wrong = []
    for name, call, expected in _catalogue(swarm, channel):
        code = call()
        codes[code] += 1
        if (expected is not None and code != expected) or (
            expected is None and code not in REFUSALS | {C.OK}
        ):
            wrong.append(f"{name}: {code.name}, expected {expected.name if expected else 'a refusal'}")
    codes += _flood_and_half_open(swarm, channel)
    logger.info(
        "hostile requests: %d, statuses %s", sum(codes.values()), {c.name: n for c, n in codes.items()}
    )
    assert not wrong, wrong
    _settled(stub, process, baseline)
    _generate_exactly(swarm, local, seed=7)


def test_a_step_on_a_session_reclaimed_while_idle_is_failed_precondition(target):
    swarm, channel, _ = target
    stream = pb_grpc.ShardStub(channel).Inference
    requests: queue.SimpleQueue = queue.SimpleQueue()
    replies = stream(iter(requests.get, None), timeout=30)
    requests.put(pb.InferenceRequest.FromString(_open(swarm)))
    next(replies)
    time.sleep(IDLE_TIMEOUT_S * 2.5)  # the reaper closes it and ends the stream
    requests.put(pb.InferenceRequest.FromString(_step()))
    with pytest.raises(grpc.RpcError) as ended:
        next(replies)
    assert ended.value.code() in (C.CANCELLED, C.FAILED_PRECONDITION)


# ---- generated requests ----

_DTYPES = st.sampled_from(["float32", "float16", "bfloat16", "int64", "bool", "float64", "", "x" * 300])
_SHAPES = st.lists(st.integers(min_value=-3, max_value=1 << 33), max_size=10) | st.lists(
    st.integers(min_value=0, max_value=8), min_size=1, max_size=4
)


@st.composite
def _tensors(draw, hidden_like: bool = False) -> pb.Tensor:
    if hidden_like and draw(st.booleans()):  # often well-formed, so that later checks are reached too
        batch, length = draw(st.integers(1, 5)), draw(st.integers(0, 6))
        width = draw(st.sampled_from([HIDDEN, HIDDEN, HIDDEN - 1, 1]))
        values = draw(st.sampled_from([0.0, 1.0, 1e30, float("nan"), float("inf")]))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
        return serialize(torch.full((batch, length, width), values).to(dtype))
    shape = draw(_SHAPES)
    data = draw(st.binary(max_size=512))
    return pb.Tensor(dtype=draw(_DTYPES), shape=shape, data=data)


def _span():
    return st.builds(
        pb.Span, start=st.integers(0, (1 << 32) - 1), end=st.integers(0, (1 << 32) - 1)
    ) | st.just(pb.Span(start=0, end=BLOCKS))


def _model_id(model_id: str):
    return st.sampled_from([model_id, model_id, "", "llama_000000000000", "\u202e" * 40])


def _forward_requests(model_id: str):
    return st.builds(
        pb.ForwardRequest,
        model_id=_model_id(model_id),
        span=_span(),
        hidden_states=_tensors(hidden_like=True),
        attention_mask=_tensors(),
        position_ids=_tensors(),
    )


def _stream_messages(model_id: str):
    opens = st.builds(
        pb.OpenSession,
        model_id=_model_id(model_id),
        span=_span(),
        max_length=st.integers(0, (1 << 32) - 1) | st.integers(1, 64),
        batch_size=st.integers(0, (1 << 32) - 1) | st.integers(1, 4),
        session_id=st.text(max_size=80),
    )
    steps = st.builds(
        pb.Step,
        step_id=st.integers(0, (1 << 64) - 1),
        position=st.integers(0, (1 << 32) - 1) | st.integers(0, 8),
        hidden_states=_tensors(hidden_like=True),
        position_ids=_tensors(),
        hypo_ids=_tensors(),
    )
    message = st.one_of(
        st.builds(lambda m: pb.InferenceRequest(open=m), opens),
        st.builds(lambda m: pb.InferenceRequest(step=m), steps),
        st.just(pb.InferenceRequest()),
    )
    return st.lists(
        message.map(lambda m: m.SerializeToString()) | st.binary(max_size=64), min_size=1, max_size=4
    )


def _fuzz(swarm, channel, process, local, examples: int) -> None:
    stub = pb_grpc.ShardStub(channel)
    _generate_exactly(swarm, local, seed=1)
    baseline = process.memory_info().rss
    codes: collections.Counter = collections.Counter()
    messages = [0]
    requests = st.one_of(
        _forward_requests(swarm.model_id).map(lambda r: ("Forward", r.SerializeToString())),
        st.tuples(st.sampled_from(["Info", "Forward", "Push"]), st.binary(max_size=256)),
        _stream_messages(swarm.model_id).map(lambda messages: ("Inference", messages)),
    )

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=False,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests)
    def attack(request):
        method, payload = request
        code = _stream(channel, payload) if method == "Inference" else _raw_unary(channel, method, payload)
        codes[code] += 1
        messages[0] += len(payload) if method == "Inference" else 1
        assert code in REFUSALS | {C.OK}, f"{method} got {code.name}"

    attack()
    logger.info(
        "fuzzed calls: %d (%d messages), statuses %s",
        sum(codes.values()),
        messages[0],
        {c.name: n for c, n in codes.items()},
    )
    assert sum(codes.values()) >= examples
    assert len(codes) >= 3  # the generator reaches several checks, not one
    _settled(stub, process, baseline)
    _generate_exactly(swarm, local, seed=8)


def test_fuzzed_requests_never_break_the_server(target, local):
    _fuzz(*target, local, FUZZ_EXAMPLES)


@pytest.mark.fuzz
def test_long_fuzz_before_a_release(target, local):
    _fuzz(*target, local, LONG_FUZZ_EXAMPLES)
