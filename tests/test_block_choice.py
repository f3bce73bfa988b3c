"""--num-blocks: a server takes the span that most improves the swarm's weakest coverage.

The rule is a pure function of a look-up, tested on hand-made records; then two real servers started
one after the other on an empty swarm cover the whole model between them.
"""

from __future__ import annotations

import re
import time

import pytest

from shardnet.dht import ServerState, ServerView, lookup
from shardnet.launch import LocalSwarm
from shardnet.server.block_choice import BlockCoverage, Peers, choose_span, coverage
from shardnet.server.placement import FirstLook, settled_span

from .conftest import server_view

PEERS = Peers(dtype="float32", quant="none", protocol="shardnet.v1")


def _per_block(views, num_blocks: int):
    """A look-up result: each record under every block of its span."""
    return [[v for v in views if v.record.start <= block < v.record.end] for block in range(num_blocks)]


def _with(view: ServerView, **changes) -> ServerView:
    """The same announcement with some fields changed."""
    return ServerView(record=view.record.copy(update=changes), expiration_time=view.expiration_time)


def _choose(views, num_blocks: int, span_blocks: int, peers: Peers = PEERS) -> tuple[int, int]:
    return choose_span(coverage(_per_block(views, num_blocks), num_blocks, peers), span_blocks)


def test_empty_swarm_takes_the_first_blocks_then_the_rest():
    assert _choose([], 6, 3) == (0, 3)
    assert _choose([server_view("A", 0, 3, state="joining", throughput=0.0)], 6, 3) == (3, 6)
    assert _choose([server_view("A", 3, 6)], 6, 3) == (0, 3)


def test_the_whole_model():
    assert _choose([server_view("A", 0, 2)], 4, 4) == (0, 4)


def test_covers_as_many_of_the_weakest_blocks_as_it_can():
    # Counts [0, 0, 1, 0, 1, 1]: 0:3 and 1:4 each leave one block uncovered; 3:6 would leave two.
    views = [server_view("A", 2, 3), server_view("B", 4, 6)]
    assert _choose(views, 6, 3) == (0, 3)
    # Counts [1, 1, 1, 1, 0, 0]: the two empty blocks, whatever the total elsewhere.
    assert _choose([server_view("A", 0, 4)], 6, 2) == (4, 6)
    # Counts [2, 2, 1, 1, 1, 1] with N=2: somewhere in the single-covered part, the first such window.
    views = [server_view("A", 0, 6), server_view("B", 0, 2)]
    assert _choose(views, 6, 2) == (2, 4)


def test_equal_counts_go_to_the_slowest_blocks():
    # One server per block; 3:6 runs 10x faster per block than 0:3.
    views = [server_view("A", 0, 3, throughput=1.0), server_view("B", 3, 6, throughput=10.0)]
    assert _choose(views, 6, 3) == (0, 3)
    views = [server_view("A", 0, 3, throughput=10.0), server_view("B", 3, 6, throughput=1.0)]
    assert _choose(views, 6, 3) == (3, 6)


def test_per_block_speed_counts_the_span_length():
    # A: 2 steps/s over 3 blocks = 6 block-steps/s; B: 4 steps/s over 1 block = 4, so block 3 is weakest.
    views = [server_view("A", 0, 3, throughput=2.0), server_view("B", 3, 4, throughput=4.0)]
    blocks = coverage(_per_block(views, 4), 4, PEERS)
    assert blocks == [BlockCoverage(1, 6.0)] * 3 + [BlockCoverage(1, 4.0)]
    assert choose_span(blocks, 1) == (3, 4)


def test_only_servers_a_client_could_chain_with_count():
    others = [
        server_view("D", 0, 3, state="draining"),
        server_view("O", 0, 3, state="offline"),
        _with(server_view("H", 0, 3), dtype="bfloat16"),
        server_view("Q", 0, 3, quant="int8"),
        _with(server_view("P", 0, 3), protocol="shardnet.v2"),
        server_view("ME", 0, 3),
    ]
    per_block = _per_block(others, 6)
    assert (
        coverage(per_block, 6, Peers("float32", "none", "shardnet.v1", ignored=frozenset({"ME"})))
        == [BlockCoverage(0, 0.0)] * 6
    )


def test_a_server_listed_twice_under_a_block_counts_once():
    view = server_view("A", 0, 2)
    assert coverage([[view, view], [view]], 2, PEERS) == [BlockCoverage(1, 5.0)] * 2


def test_an_announced_span_stays_unless_counts_say_otherwise():
    # Speeds alone (a JOINING server came ONLINE with a measured throughput) never make a server move.
    blocks = [BlockCoverage(1, 10.0)] * 3 + [BlockCoverage(1, 1.0)] * 3
    assert choose_span(blocks, 3) == (3, 6)
    assert choose_span(blocks, 3, keep=(0, 3)) == (0, 3)
    # Counts do: another server took 0:3 too, and 3:6 has nobody.
    blocks = [BlockCoverage(1, 0.0)] * 3 + [BlockCoverage(0, 0.0)] * 3
    assert choose_span(blocks, 3, keep=(0, 3)) == (3, 6)


def test_servers_that_chose_together_split_by_peer_id():
    """A and B looked at an empty swarm at the same moment and both announced 0:3: A (lower id) stays,
    B moves. C was there at B's first look, so it counts whatever its id."""
    a, b = server_view("A", 0, 3, state="joining"), server_view("B", 0, 3, state="joining")
    per_block = _per_block([a, b], 6)
    alone = FirstLook(span=(0, 3), seen=frozenset(), looked_at=0.0)
    assert settled_span(per_block, alone, "A", PEERS, 3) == (0, 3)
    assert settled_span(per_block, alone, "B", PEERS, 3) == (3, 6)

    c = server_view("C", 3, 5, state="joining")
    per_block = _per_block([b, c], 6)
    saw_c = FirstLook(span=(0, 3), seen=frozenset({"C"}), looked_at=0.0)
    assert settled_span(per_block, saw_c, "B", PEERS, 3) == (0, 3)  # nobody new: B keeps its span


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        choose_span([BlockCoverage(0, 0.0)] * 3, 4)
    with pytest.raises(ValueError):
        choose_span([BlockCoverage(0, 0.0)] * 3, 0)


# ---- two real servers ----


def _records(swarm: LocalSwarm):
    found = {}
    for views in lookup(swarm._probe, swarm.model_id, swarm.num_blocks):
        for view in views:
            found[view.record.peer_id] = view.record
    return list(found.values())


def test_two_servers_choosing_three_blocks_cover_six(llama_untied, tmp_path):
    """On an empty 6-block swarm, `--num-blocks 3` twice (the second started once the first announced
    JOINING) covers 0:6. Both run with `--dtype auto` on the CPU, so both announce float32."""
    swarm = LocalSwarm(llama_untied, [], dtype="auto", log_dir=tmp_path, torch_threads=1)
    try:
        swarm.start_dht()
        swarm.start_server_choosing(3)
        deadline = time.monotonic() + 120
        while not _records(swarm):
            assert time.monotonic() < deadline, "the first server never announced itself"
            assert swarm.servers[0].poll() is None, (tmp_path / "server_n3.log").read_text()
            time.sleep(0.2)
        swarm.start_server_choosing(3)
        swarm.wait_ready(timeout_s=180)
        records = _records(swarm)
        assert sorted((r.start, r.end) for r in records) == [(0, 3), (3, 6)]
        assert {(r.state, r.dtype) for r in records} == {(ServerState.ONLINE.value, "float32")}
        first = (tmp_path / "server_n3.log").read_text()
        assert "chose blocks 0:3 for --num-blocks 3" in first
        assert re.search(r"server ready: .* blocks=0:3 device=cpu dtype=float32 ", first), first
    finally:
        swarm.stop()


@pytest.mark.slow  # before a release: pytest -m slow (README "Tests")
def test_two_servers_started_together_cover_six(llama_untied, tmp_path):
    """Started at the same moment, each may choose before the other has announced; the second look
    after announcing splits them (the lower peer id stays)."""
    swarm = LocalSwarm(llama_untied, [], log_dir=tmp_path, torch_threads=1)
    try:
        swarm.start_dht()
        swarm.start_server_choosing(3)
        swarm.start_server_choosing(3)
        swarm.wait_ready(timeout_s=180)
        assert sorted((r.start, r.end) for r in _records(swarm)) == [(0, 3), (3, 6)]
    finally:
        swarm.stop()
