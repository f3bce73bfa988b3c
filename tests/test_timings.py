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
    clock = ChainClock(hops, began=0.0, clocks=[None] * len(hops), round_trip_s=lambda peer_id: 2 * MS)
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
    clock = ChainClock(hops, began=0.0, clocks=[None] * len(hops), round_trip_s=lambda peer_id: None)
    clock.sent(0, 0.4 * MS)
    clock.answered(0, _answer(1, 3, 0.3), arrived=6.7 * MS, decoded=7.0 * MS)  # round trip 2 ms
    hop = hops[0]
    assert (hop.network_s, hop.return_s) == pytest.approx((1.4 * MS, 1.6 * MS))
    assert hop.total_s == pytest.approx(7.0 * MS)


def test_a_failed_push_puts_the_hop_s_answer_and_the_client_s_delivery_on_the_path():
    """Hop 0 could not push: the client waited on its answer, then delivered the step to hop 1 itself."""
    hops = _hops(2)
    clock = ChainClock(hops, began=0.0, clocks=[None] * len(hops), round_trip_s=lambda peer_id: 2 * MS)
    clock.sent(0, 0.5 * MS)
    clock.answered(
        0, _answer(1, 4, 0.5, push_ms=3, push_error="push failed: UNAVAILABLE"), 11 * MS, 11.5 * MS
    )
    clock.sent(1, 12 * MS)
    clock.answered(1, _answer(1, 4, 0.5), arrived=19.5 * MS, decoded=20 * MS)
    assert not any(hop.pending for hop in hops)
    assert hops[0].return_s > 0 and hops[1].network_s == pytest.approx(1.5 * MS)
    assert sum(hop.total_s for hop in hops) == pytest.approx(20 * MS)


def test_a_failed_over_hop_counts_the_wait_for_its_failure_and_its_replacement():
    """Hop 0 got the step at t=0 and hung: the client gave up at 30 ms, and the replacement's output was
    ready at 90. Hop 1, delivered the output by the client at 91, answered at 99: the parts add up to 99."""
    hops = _hops(2)
    clock = ChainClock(hops, began=0.0, clocks=[None] * len(hops), round_trip_s=lambda peer_id: 2 * MS)
    clock.sent(0, 0.5 * MS)
    clock.failed_over(0, began=30 * MS, ended=90 * MS)
    assert hops[0].failed_over and not hops[0].pending and hops[0].as_ms()["failover_ms"] == pytest.approx(90)
    assert hops[1].pending  # its network starts from the replacement's output, once its answer is read
    clock.sent(1, 91 * MS)
    clock.answered(1, _answer(1, 4, 0.5), arrived=98.5 * MS, decoded=99 * MS)
    assert not hops[1].pending and hops[1].network_s == pytest.approx(2 * MS)
    assert StepTiming(99 * MS, 1, hops).critical_path_s == pytest.approx(99 * MS)


def test_a_failed_pushed_hop_s_time_starts_at_the_output_before_it():
    """Under push, hop 1's input was ready when hop 0's output was (read at 12.7 ms); it failed at 40."""
    hops = _hops(2)
    clock = ChainClock(hops, began=0.0, clocks=[None] * len(hops), round_trip_s=lambda peer_id: 2 * MS)
    clock.sent(0, 1 * MS)
    clock.answered(0, _answer(2, 5, 0.5, push_ms=2), arrived=12.5 * MS, decoded=12.7 * MS)
    clock.failed_over(1, began=40 * MS, ended=70 * MS)
    assert hops[1].failover_s == pytest.approx(57.3 * MS)


def test_a_clock_offset_is_taken_from_the_quickest_exchange_and_dates_one_way_trips():
    """The peer's clock runs 1000 s ahead. A slow exchange (3 ms out, 1 ms back) alone puts the offset
    1 ms off; a quick symmetric one (0.2 ms each way) corrects it, and later trips are dated right."""
    from shardnet.wire.clock_offset import ClockOffset

    ahead = 1000.0
    clock = ClockOffset()
    assert clock.offset_s is None and clock.one_way_to(0.0, ahead) is None
    clock.add(sent=0.0, peer_arrived=ahead + 3 * MS, peer_replied=ahead + 4 * MS, received=5 * MS)
    assert clock.offset_s == pytest.approx(ahead + 1 * MS)
    clock.add(sent=10 * MS, peer_arrived=ahead + 10.2 * MS, peer_replied=ahead + 11 * MS, received=11.2 * MS)
    assert clock.offset_s == pytest.approx(ahead)
    assert clock.one_way_to(20 * MS, ahead + 22.5 * MS) == pytest.approx(2.5 * MS)
    assert clock.one_way_from(ahead + 30 * MS, 30.7 * MS) == pytest.approx(0.7 * MS)
    clock.add(
        sent=40 * MS, peer_arrived=0.0, peer_replied=0.0, received=41 * MS
    )  # an older server: no stamps
    assert clock.offset_s == pytest.approx(ahead)


def test_with_dated_clocks_an_asymmetric_push_is_split_as_it_happened():
    """Hop 0's push took 0.5 ms out and 3.5 ms back (its acknowledgement waited): half the round trip
    would say 2 ms; the push's one-way time, dated on both clocks, says 0.5."""
    from shardnet.wire.clock_offset import ClockOffset

    hops = _hops(2)
    first, second = ClockOffset(), ClockOffset()
    for clock, ahead in ((first, 50.0), (second, -7.0)):  # opened earlier: 0.1 ms each way
        clock.add(sent=0.0, peer_arrived=ahead + 0.1 * MS, peer_replied=ahead + 0.2 * MS, received=0.3 * MS)
    clock = ChainClock(hops, began=1.0, clocks=[first, second], round_trip_s=lambda peer_id: None)
    clock.sent(0, 1.0 + 0.2 * MS)  # at hop 0 at 1.0003: queue 1, compute 2, send 0.5 -> pushed at 1.0038
    pushed = _answer(1, 2, 0.5, push_ms=4)
    pushed.push_one_way_s = 0.5 * MS  # at hop 1 at 1.0043: queue 1, compute 2, send 0.3 -> reply at 1.0076
    pushed.arrived_at_s, pushed.replied_at_s = 50.0 + 1.0003, 50.0 + 1.0003 + 7.5 * MS
    last = _answer(1, 2, 0.3)
    last.arrived_at_s, last.replied_at_s = -7.0 + 1.0043, -7.0 + 1.0076
    clock.answered(1, last, arrived=1.0 + 8.0 * MS, decoded=1.0 + 8.4 * MS)  # back in 0.4 ms, decoded in 0.4
    clock.answered(0, pushed, arrived=1.0 + 8.1 * MS, decoded=1.0 + 8.2 * MS)
    assert [hop.network_s / MS for hop in hops] == pytest.approx([0.3, 1.0])
    assert hops[1].return_s == pytest.approx(1.1 * MS)  # encoding 0.3, the trip 0.4, decoding 0.4
    assert sum(hop.total_s for hop in hops) == pytest.approx(8.4 * MS)
