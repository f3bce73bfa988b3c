"""Decode steps of concurrent sessions share one forward pass, and each session's output stays its own.

The backend tests run in-process on every supported architecture (sliding windows, MoE, learned
positions): eight sessions with prompts of different lengths, one of them batch 2 with left padding,
one rolled back and one reordered between steps, decode together; each step's output must equal the
same session's step run alone. The compute is held while the eight queue, so the batch always forms.
The ComputeQueue tests check the order compute is served in, what may share a batch, and that all of it
runs on the queue's one thread.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoConfig

from shardnet.models import adapter_for
from shardnet.models.checkpoint import Checkpoint
from shardnet.server.backend import SpanBackend, SpanLimits, StepInput
from shardnet.server.compute_queue import ComputeQueue
from shardnet.server.compute_threads import ComputeThreads
from shardnet.server.sessions import Session
from shardnet.server.step_path import run_step

from .arch_configs import ARCHITECTURES, build_model

PROMPT_LENGTHS = [1, 2, 3, 5, 6, 8, 9, 12]  # around and past the sliding window (4)
PADDED = 3  # this session is batch 2, its first row left-padded by two positions
ROLLED_BACK = 5  # this one drops its last two positions before the second decode step
REORDERED = PADDED  # and this one swaps its rows before the third
DECODE_STEPS = 3
START, END = 1, 4  # sessions run a part of the span (absolute block indices)


def _wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.001)


def _backend(path) -> SpanBackend:
    config = AutoConfig.from_pretrained(path)
    span = adapter_for(config).load_span(Checkpoint(path), config, 0, 4, torch.float32)
    limits = SpanLimits("test", 0, 4, config.hidden_size, 8, 64, 512)
    return SpanBackend(span, torch.float32, limits)


def _steps(hidden_size: int) -> list[list[StepInput]]:
    """Per session: its prefill, then its decode steps."""
    generator = torch.Generator().manual_seed(0)
    sessions = []
    for index, length in enumerate(PROMPT_LENGTHS):
        batch = 2 if index == PADDED else 1
        mask = positions = None
        if index == PADDED:
            mask = torch.ones(batch, length, dtype=torch.int64)
            mask[0, :2] = 0
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        steps = [StepInput(torch.randn(batch, length, hidden_size, generator=generator), mask, positions)]
        for decode in range(DECODE_STEPS):
            rows = torch.tensor([1, 0]) if index == REORDERED and decode == 2 else None
            if index == PADDED:
                done = length + decode
                positions = torch.tensor([[done - 2], [done]])
            hidden = torch.randn(batch, 1, hidden_size, generator=generator)
            steps.append(StepInput(hidden, None if mask is None else torch.ones(batch, 1), positions, rows))
        sessions.append(steps)
    return sessions


def _open(backend: SpanBackend, index: int, batch: int) -> Session:
    return Session(f"s{index}", START, END, batch, 64, backend.span.new_cache())


def _decode(backend: SpanBackend, session: Session, index: int, decode: int, step: StepInput) -> torch.Tensor:
    keep = session.position - 2 if index == ROLLED_BACK and decode == 1 else session.position
    return run_step(backend, session, step, keep)[0]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_batched_decode_steps_equal_each_session_alone(name, tmp_path):
    backend = _backend(build_model(name, tmp_path / name))
    inputs = _steps(backend.limits.hidden_size)

    alone = []  # [session][decode] outputs, each session run by itself
    for index, steps in enumerate(inputs):
        session = _open(backend, index, steps[0].hidden_states.shape[0])
        run_step(backend, session, steps[0])
        alone.append([_decode(backend, session, index, d, step) for d, step in enumerate(steps[1:])])
    assert backend.compute.batches_run == 0

    sessions = []
    for index, steps in enumerate(inputs):
        sessions.append(_open(backend, index, steps[0].hidden_states.shape[0]))
        run_step(backend, sessions[-1], steps[0])
    together: list[list[torch.Tensor]] = [[] for _ in inputs]
    for decode in range(DECODE_STEPS):
        release, holder = _holding(backend.compute)

        def run(index: int, decode: int = decode) -> None:
            step = inputs[index][1 + decode]
            together[index].append(_decode(backend, sessions[index], index, decode, step))

        threads = [threading.Thread(target=run, args=(index,)) for index in range(len(inputs))]
        for thread in threads:
            thread.start()
        _wait_until(lambda: backend.compute.waiting == len(inputs))
        release.set()
        for thread in [holder, *threads]:
            thread.join(timeout=60)

    assert backend.compute.batches_run == DECODE_STEPS
    assert backend.compute.steps_batched == DECODE_STEPS * len(inputs)
    for index, (solo, batched) in enumerate(zip(alone, together, strict=True)):
        for decode, (want, got) in enumerate(zip(solo, batched, strict=True)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"session {index} step {decode}")
        dropped = 2 if index == ROLLED_BACK else 0
        assert sessions[index].position == PROMPT_LENGTHS[index] + DECODE_STEPS - dropped


def _queue_up(queue: ComputeQueue, count: int, call) -> list[threading.Thread]:
    """Start ``count`` threads that each call ``call(index)``, queued in a known order."""
    threads = []
    for index in range(count):
        thread = threading.Thread(target=call, args=(index,))
        thread.start()
        _wait_until(lambda index=index: queue.waiting == index + 1)
        threads.append(thread)
    return threads


def _holding(queue: ComputeQueue) -> tuple[threading.Event, threading.Thread]:
    """Keep the compute thread busy until the event is set; the queue fills meanwhile."""
    release, started = threading.Event(), threading.Event()
    holder = threading.Thread(target=queue.run, args=(lambda: (started.set(), release.wait(60)),))
    holder.start()
    started.wait(30)
    return release, holder


def test_compute_is_served_in_arrival_order_on_one_thread():
    queue, order, threads_used = ComputeQueue(max_batch_rows=8), [], set()

    def work(index: int) -> None:
        order.append(index)
        threads_used.add(threading.current_thread().name)

    release, holder = _holding(queue)
    threads = _queue_up(queue, 5, lambda index: queue.run(lambda: work(index)))
    release.set()
    for thread in [holder, *threads]:
        thread.join(timeout=30)
    assert order == [0, 1, 2, 3, 4]
    assert queue.waiting == 0
    assert threads_used == {"compute"}
    assert queue.run(lambda: queue.run(lambda: "nested")) == "nested"  # from the compute thread: inline


def test_a_holder_that_asks_again_queues_behind_the_waiter():
    queue, order = ComputeQueue(max_batch_rows=8), []
    release, holder = _holding(queue)  # a long step's chunk 1
    [waiter] = _queue_up(queue, 1, lambda index: queue.run(lambda: order.append("decode")))
    release.set()
    holder.join(timeout=30)  # chunk 1 done, and the long step asks for chunk 2 right away
    queue.run(lambda: order.append("chunk 2"))
    waiter.join(timeout=30)
    assert order == ["decode", "chunk 2"]


def test_alike_waiters_share_a_batch_within_the_row_limit():
    queue = ComputeQueue(max_batch_rows=4)
    batches, results = [], {}

    def run_many(items):
        batches.append([item for item, _ in items])
        return [f"out {item}" for item, _ in items]

    def ask(index: int) -> None:  # items 0..5 of key "a" or "b", 1 or 2 rows each
        key, rows = ("a" if index != 2 else "b"), (2 if index == 1 else 1)
        results[index] = queue.run_batched(key, (index, rows), rows, run_many)

    release, holder = _holding(queue)
    threads = _queue_up(queue, 6, ask)
    release.set()
    for thread in [holder, *threads]:
        thread.join(timeout=30)
    # 0 leads and takes 1 (2 rows) and 3 (4 rows, full); 2 is another key; 4 then leads 4 and 5.
    assert batches == [[0, 1, 3], [2], [4, 5]]
    assert results == {index: f"out {index}" for index in range(6)}
    assert (queue.batches_run, queue.steps_batched) == (2, 5)


def test_an_error_in_a_batch_reaches_every_member_and_the_queue_goes_on():
    queue = ComputeQueue(max_batch_rows=8)
    errors = {}

    def fail(items):
        raise RuntimeError(f"batch of {len(items)}")

    def ask(index: int) -> None:
        try:
            queue.run_batched("a", index, 1, fail)
        except RuntimeError as error:
            errors[index] = str(error)

    release, holder = _holding(queue)
    threads = _queue_up(queue, 3, ask)
    release.set()
    for thread in [holder, *threads]:
        thread.join(timeout=30)
    assert errors == dict.fromkeys(range(3), "batch of 3")
    assert queue.run(lambda: "still serving") == "still serving"


def test_the_server_chooses_one_thread_while_loaded_and_all_of_them_alone():
    before = torch.get_num_threads()
    try:
        chosen = ComputeThreads(most=2, adaptive=True, hold_s=3600.0)
        assert chosen.before(sessions=1, waiting=0) == 2  # a lone step: every core
        assert torch.get_num_threads() == 2
        assert chosen.before(sessions=3, waiting=0) == 1  # a batch: one thread, so servers share the cores
        assert torch.get_num_threads() == 1
        assert chosen.before(sessions=1, waiting=0) == 1  # held while the load may come back
        assert ComputeThreads(most=2, adaptive=True, hold_s=0.0).before(sessions=1, waiting=0) == 2
        assert torch.get_num_threads() == 2
        fixed = ComputeThreads.for_server(2)  # the owner's --torch-threads: never changed
        assert fixed.before(sessions=5, waiting=9) == 2
    finally:
        torch.set_num_threads(before)


def test_the_compute_queue_tells_the_thread_choice_about_batches_and_waiters():
    seen = []

    class Recording(ComputeThreads):
        def before(self, sessions: int, waiting: int) -> int:
            seen.append((sessions, waiting))
            return 1

    queue = ComputeQueue(max_batch_rows=8, threads=Recording(1, adaptive=False))
    release, holder = _holding(queue)
    keys = ["k", "j", "k"]
    threads = _queue_up(queue, 3, lambda index: queue.run_batched(keys[index], index, 1, lambda items: items))
    release.set()
    for thread in [holder, *threads]:
        thread.join(timeout=30)
    assert seen == [(1, 0), (2, 1), (1, 0)]  # the holder; both "k" with "j" waiting; then "j" alone


def test_all_cores_serve_a_lone_step_only_where_they_make_it_faster():
    before = torch.get_num_threads()

    def runner(costs: dict[int, float]):
        return lambda: lambda position: time.sleep(costs[torch.get_num_threads()])

    try:
        same = ComputeThreads(most=2, adaptive=True)
        # no gain: leave a core to others. Steps of 20 ms, so that a loaded machine's late wake-ups (a
        # millisecond or two) cannot pass for the gain it takes (CI saw 2 ms sleeps give one)
        assert same.choose_most(runner({1: 0.02, 2: 0.02})) == 1
        assert torch.get_num_threads() == 1
        faster = ComputeThreads(most=2, adaptive=True)
        assert faster.choose_most(runner({1: 0.004, 2: 0.001})) == 2
        assert torch.get_num_threads() == 2
        assert ComputeThreads(most=2, adaptive=False).choose_most(runner({1: 0.0, 2: 1.0})) == 2  # fixed
    finally:
        torch.set_num_threads(before)
