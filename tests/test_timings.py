"""ChainClock on made-up answers: how a step's time is split per hop (network, queue, compute, return),
which hops stay pending until the answers they need are read, and that the parts add up to the step."""

from __future__ import annotations

import pytest

from shardnet.client.timings import ChainClock, HopTiming, StepTiming
from shardnet.wire import pb

MS = 1e-3


def _answer(queue_ms, compute_ms, send_ms, push_ms=0.0, push_error="") -> pb.StepResult:
    """A server's answer; its handle time is the sum of its parts (as step_path reports it)."""
    return pb.StepResult(
        queue_s=queue_ms * MS,
        compute_s=compute_ms * MS,
        send_s=send_ms * MS,
        push_s=push_ms * MS,
        handle_s=(queue_ms + compute_ms + send_ms + push_ms) * MS,
        push_error=push_error,
    )


def _hops(count: int) -> list[HopTiming]:
    return [HopTiming(span=f"{i}:{i + 1}", peer_id=f"peer{i}") for i in range(count)]


def test_a_pushed_chain_adds_up_and_is_pending_until_the_answers_it_needs_are_read():
    """Three hops, one-way trips of 1 ms everywhere (a push's round trip 2 ms): the client sends at
    t=1 ms (began at 0), hop 0 queues 2 and computes 5, encodes 0.5 and pushes; hop 1 likewise; hop 2
    answers the client, which decodes its output in 0.5 ms."""
    hops = _hops(3)
    clock = ChainClock(hops, began=0.0, round_trip_s=lambda peer_id: 2 * MS)
    clock.sent(0, 1 * MS)
    # the timeline: hop 0 gets it at 2; output at 9; pushed at 9.5, at hop 1 at 10.5; output at 17.5;
    # pushed at 18, at hop 2 at 19; output at 26; reply encoded at 26.5, at the client at 27.5, decoded 28
    last = _answer(2, 5, 0.5)
    clock.answered(2, last, arrived=27.5 * MS, decoded=28 * MS)
    assert [hop.pending for hop in hops] == [True, True, True]  # hop 2's network needs hop 1's answer
    assert StepTiming(28 * MS, 1, hops).as_ms()["critical_path_ms"] is None
    clock.answered(1, _answer(2, 5, 0.5, push_ms=2), arrived=20 * MS, decoded=20.2 * MS)
    assert [hop.pending for hop in hops] == [True, True, False]
    assert hops[0].as_ms()["network_ms"] is None and hops[1].as_ms()["total_ms"] is None
    # hop 0 answered the client after its push was acknowledged: at 9.5 + 2 = 11.5, at the client at 12.5
    clock.answered(0, _answer(2, 5, 0.5, push_ms=2), arrived=12.5 * MS, decoded=12.7 * MS)
    assert not any(hop.pending for hop in hops)
    parts = [part / MS for hop in hops for part in (hop.network_s, hop.queue_s, hop.compute_s, hop.return_s)]
    assert parts == pytest.approx([2, 2, 5, 0] + [1.5, 2, 5, 0] + [1.5, 2, 5, 2])
    step = StepTiming(28 * MS, 1, hops)
    assert step.critical_path_s == pytest.approx(step.step_s)
    assert step.as_ms()["hops"][2]["return_ms"] == pytest.approx(2.0)


def test_a_client_chained_hop_adds_up_exactly():
    """A hop the client sends and waits on: its own round trip splits network and return."""
    hops = _hops(1)
    clock = ChainClock(hops, began=0.0, round_trip_s=lambda peer_id: None)
    clock.sent(0, 0.4 * MS)
    clock.answered(0, _answer(1, 3, 0.3), arrived=6.7 * MS, decoded=7.0 * MS)  # round trip 2 ms
    hop = hops[0]
    assert (hop.network_s, hop.return_s) == pytest.approx((1.4 * MS, 1.6 * MS))
    assert hop.total_s == pytest.approx(7.0 * MS)


def test_a_failed_push_puts_the_hop_s_answer_and_the_client_s_delivery_on_the_path():
    """Hop 0 could not push: the client waited on its answer, then delivered the step to hop 1 itself."""
    hops = _hops(2)
    clock = ChainClock(hops, began=0.0, round_trip_s=lambda peer_id: 2 * MS)
    clock.sent(0, 0.5 * MS)
    clock.answered(
        0, _answer(1, 4, 0.5, push_ms=3, push_error="push failed: UNAVAILABLE"), 11 * MS, 11.5 * MS
    )
    clock.sent(1, 12 * MS)
    clock.answered(1, _answer(1, 4, 0.5), arrived=19.5 * MS, decoded=20 * MS)
    assert not any(hop.pending for hop in hops)
    assert hops[0].return_s > 0 and hops[1].network_s == pytest.approx(1.5 * MS)
    assert sum(hop.total_s for hop in hops) == pytest.approx(20 * MS)


def test_a_failed_over_hop_is_marked_and_counts_its_replacement():
    hops = _hops(2)
    clock = ChainClock(hops, began=0.0, round_trip_s=lambda peer_id: 2 * MS)
    clock.failed_over(0, began=30 * MS, ended=90 * MS)
    assert hops[0].failed_over and not hops[0].pending and hops[0].as_ms()["failover_ms"] == pytest.approx(60)
    assert hops[1].pending  # its network starts from the replacement's output, once its answer is read
