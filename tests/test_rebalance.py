"""Rebalancing: a --num-blocks server moves when that lifts the swarm's weakest block enough (Petals'
rule, old minimum / new minimum < 0.75), never off a span it alone holds, never in a balanced swarm."""

from __future__ import annotations

import random
import signal
import time

import pytest
import torch

from shardnet import ShardedModel
from shardnet.dht import lookup
from shardnet.launch import LocalSwarm, listening_ports
from shardnet.server.block_choice import Peers
from shardnet.server.config import ServerConfig
from shardnet.server.rebalance import (
    PERIOD_JITTER,
    RECHECK_SHARE,
    better_span,
    next_check_s,
    recheck_delay_s,
)

from .conftest import reference, server_view

PEERS = Peers(dtype="float32", quant="none", protocol="shardnet.v1")


def _per_block(views, num_blocks: int = 6):
    return [[v for v in views if v.record.start <= block < v.record.end] for block in range(num_blocks)]


def _move(views, span=(0, 3), me="M"):
    move = better_span(_per_block(views), me, span, PEERS)
    return None if move is None else move.target


def test_a_hole_draws_a_server_that_is_not_alone_on_its_span():
    views = [server_view("X", 0, 3), server_view("M", 0, 3)]
    assert _move(views) == (3, 6)
    # Holders that are gone or resting leave the hole a hole; draining ones too.
    for state in ("offline", "resting", "draining"):
        assert _move([*views, server_view("R", 3, 6, state=state)]) == (3, 6), state


def test_a_balanced_swarm_never_moves():
    assert _move([server_view("X", 3, 6), server_view("M", 0, 3)]) is None  # leaving would open a hole
    replicas = [
        server_view("X", 0, 3),
        server_view("M", 0, 3),
        server_view("Y", 3, 6),
        server_view("Z", 3, 6),
    ]
    assert _move(replicas) is None
    # Speeds wobble (measured on a busy machine), counts stay equal: still nobody moves.
    uneven = [
        server_view("X", 0, 3, throughput=1.0),
        server_view("M", 0, 3, throughput=9.0),
        server_view("Y", 3, 6, throughput=3.0),
        server_view("Z", 3, 6, throughput=5.0),
    ]
    assert _move(uneven) is None
    whole = [server_view("X", 0, 6), server_view("M", 0, 3)]  # X covers all: M's place is as good as any
    assert _move(whole) is None


def test_the_ratio_rule():
    """M (3:6) beside D2 (3:6) and D1 alone on 0:3: moving to 0:3 makes the weakest block min(a+m, b)
    instead of min(a, b+m); it moves only if the old minimum is under 0.75 of the new."""
    a, b, m = 3.0, 10.0, 10.0  # per-block steps/s: throughput x 3 blocks
    slow = [
        server_view("D1", 0, 3, throughput=a / 3),
        server_view("D2", 3, 6, throughput=b / 3),
        server_view("M", 3, 6, throughput=m / 3),
    ]
    move = better_span(_per_block(slow), "M", (3, 6), PEERS)
    assert move.target == (0, 3) and move.quality == pytest.approx(a / min(a + m, b))
    a, m = 9.0, 3.0  # 9 / min(12, 10) = 0.9: not worth a move
    close = [
        server_view("D1", 0, 3, throughput=a / 3),
        server_view("D2", 3, 6, throughput=b / 3),
        server_view("M", 3, 6, throughput=m / 3),
    ]
    assert better_span(_per_block(close), "M", (3, 6), PEERS) is None


def test_a_hole_being_filled_draws_nobody_else():
    """A JOINING server has measured nothing yet; it counts as fast as us, so its hole is not empty."""
    views = [
        server_view("X", 0, 3),
        server_view("M", 0, 3),
        server_view("N", 3, 6, state="joining", throughput=0.0),
    ]
    assert _move(views) is None
    # Nor a server of another dtype, nor one that is not serving (M itself resting or joining).
    assert _move([server_view("X", 0, 3), server_view("M", 0, 3, state="joining")]) is None
    assert _move([*views[:2], server_view("B", 3, 6, dtype="bfloat16")]) == (3, 6)


def test_periods_are_jittered():
    rng = random.Random(0)
    checks = [next_check_s(60.0, rng) for _ in range(200)]
    assert 60 * (1 - PERIOD_JITTER) <= min(checks) < max(checks) <= 60 * (1 + PERIOD_JITTER)
    delays = [recheck_delay_s(60.0, rng) for _ in range(200)]
    assert 60 * RECHECK_SHARE[0] <= min(delays) < max(delays) <= 60 * RECHECK_SHARE[1]


def test_only_num_blocks_servers_with_a_period_rebalance(tmp_path):
    assert not ServerConfig(model_path=tmp_path, blocks=(0, 2)).rebalances
    assert ServerConfig(model_path=tmp_path, num_blocks=2).rebalances
    assert not ServerConfig(model_path=tmp_path, num_blocks=2, rebalance_period_s=0).rebalances
    with pytest.raises(Exception, match="--rebalance-period"):
        ServerConfig(model_path=tmp_path, num_blocks=2, rebalance_period_s=-1)


# ---- real servers ----

PERIOD_S = 2.0


def _spans(swarm: LocalSwarm) -> dict[int, tuple[str, int, int]]:
    """gRPC port -> (state, start, end) of its server's freshest record."""
    freshest = {}
    for views in lookup(swarm._probe, swarm.model_id, swarm.num_blocks):
        for view in views:
            known = freshest.get(view.record.peer_id)
            if known is None or view.expiration_time > known.expiration_time:
                freshest[view.record.peer_id] = view
    return {v.record.port: (v.record.state, v.record.start, v.record.end) for v in freshest.values()}


def _watch(swarm: LocalSwarm, port: int, expected: tuple[str, int, int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert _spans(swarm).get(port) == expected
        time.sleep(0.2)


def test_a_server_moves_into_a_hole_once_and_then_stays(llama_untied, tmp_path):
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(7))
    want = reference(llama_untied).generate(ids, max_new_tokens=12, do_sample=False)
    with LocalSwarm(llama_untied, [(0, 3), (3, 6), (3, 6)], log_dir=tmp_path, torch_threads=1) as swarm:
        mover = swarm.start_server_choosing(3, ["--rebalance-period", str(PERIOD_S), "--drain-timeout", "2"])
        swarm.wait_ready(timeout_s=120)
        [port] = listening_ports(mover.pid) & set(_spans(swarm))
        # Two holders of 3:6, one of 0:3: it joins 0:3, and with 2 servers on every block it stays.
        _watch(swarm, port, ("online", 0, 3), 2.2 * PERIOD_S)

        # Every holder of 3:6 leaves: it moves there within a period (and its wait before moving).
        for holder in swarm.servers[1:3]:
            holder.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 6 * PERIOD_S + 10
        while _spans(swarm).get(port) != ("online", 3, 6):
            assert time.monotonic() < deadline, f"still {_spans(swarm).get(port)}"
            time.sleep(0.2)
        # Alone on 3:6 now, as the other server is on 0:3: nothing moves any more.
        _watch(swarm, port, ("online", 3, 6), 2.2 * PERIOD_S)
        with ShardedModel.from_pretrained(llama_untied, swarm.initial_peers) as model:
            got = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert got.tolist() == want.tolist()
    log = (tmp_path / "server_n3.log").read_text()
    assert log.count("moving from blocks") == 1 and "moved from blocks 0:3 to 3:6" in log, log[-3000:]


def test_a_server_that_decided_second_sees_the_first_ones_claim():
    """M1 and M2 (with X on 0:3) both saw the hole at 3:6. M1 moved first: it announced a JOINING claim
    on 3:6 with its speed and drains 0:3. M2's second look then finds no reason to move."""
    views = [
        server_view("X", 0, 3),
        server_view("M1", 0, 3, state="draining"),
        server_view("M1", 3, 6, state="joining"),  # the claim, with M1's measured speed
        server_view("M2", 0, 3),
    ]
    assert _move(views, me="M2") is None
    assert _move(views[:2] + views[3:], me="M2") == (3, 6)  # without the claim it would have gone too
