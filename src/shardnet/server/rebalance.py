"""When a ``--num-blocks`` server moves: only if that lifts the swarm's weakest block by enough.

A block's strength is the summed speed of the servers holding it (``block_choice.coverage``); the
swarm is as strong as its weakest block. Every ``--rebalance-period`` seconds (jittered, so servers do
not check in step) a server takes itself out of the swarm, puts itself back where
``block_choice.choose_span`` would place it now, and compares the weakest block before and after. It
moves when before / after < ``BALANCE_QUALITY`` (0.75, as Petals' ``should_choose_other_blocks``),
never when leaving its span would open a hole that is not there now, and never when the place
chosen is its own. A JOINING server has measured nothing yet (speed 0); it is counted as fast as this
one, so a hole being filled does not look empty and draw a second server.

Servers that see the same hole at the same moment would all move. So a server that decided waits a
random ``recheck_delay_s`` and decides again on a fresh look-up before it moves: the first to move
announces its destination at once (``server/lifecycle.py``), and the others' second look sees it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

from shardnet.dht import ServerState, ServerView
from shardnet.server.block_choice import BlockCoverage, Peers, choose_span, coverage, describe_coverage

logger = logging.getLogger(__name__)
BALANCE_QUALITY = 0.75  # move when the weakest block before / after the move is below this
PERIOD_JITTER = 0.2  # each period is uniformly within +-20% of --rebalance-period
RECHECK_SHARE = (0.1, 0.5)  # the wait before the second look, as a share of the period
_EPS = 1e-9


@dataclass(frozen=True)
class Move:
    target: tuple[int, int]  # the span to move to, half-open
    before_steps_per_s: float  # the weakest block's speed now
    after_steps_per_s: float  # and after the move

    @property
    def quality(self) -> float:
        return self.before_steps_per_s / self.after_steps_per_s


def next_check_s(period_s: float, rng: random.Random | None = None) -> float:
    """Seconds until the next check: the period, jittered."""
    return period_s * (rng or random).uniform(1 - PERIOD_JITTER, 1 + PERIOD_JITTER)


def recheck_delay_s(period_s: float, rng: random.Random | None = None) -> float:
    """Seconds between deciding to move and the look that confirms it."""
    return period_s * (rng or random).uniform(*RECHECK_SHARE)


def better_span(
    per_block: list[list[ServerView]], own_peer_id: str, span: tuple[int, int], peers: Peers
) -> Move | None:
    """The move that would lift the weakest block enough, or None (stay)."""
    num_blocks, span_blocks = len(per_block), span[1] - span[0]
    own = _own_record(per_block, own_peer_id)
    if own is None or own.state != ServerState.ONLINE.value:
        return None  # not serving here (as the DHT sees it): nothing to compare
    own_speed = own.throughput * span_blocks  # one block's speed on this server, steps/s
    with_us = _with_joining_as(coverage(per_block, num_blocks, peers), per_block, peers, own_speed)
    alone = replace(peers, ignored=peers.ignored | {own_peer_id})
    without_us = _with_joining_as(coverage(per_block, num_blocks, alone), per_block, alone, own_speed)
    if min(c.servers for c in with_us) > 0 and min(c.servers for c in without_us) == 0:
        return None  # leaving would open a hole
    target = choose_span(without_us, span_blocks)
    if target == span:
        return None  # already where it would go
    after = [
        BlockCoverage(c.servers + 1, c.steps_per_s + own_speed) if target[0] <= i < target[1] else c
        for i, c in enumerate(without_us)
    ]
    before_min = min(c.steps_per_s for c in with_us)
    after_min = min(c.steps_per_s for c in after)
    if after_min <= _EPS or after_min < before_min:
        return None
    move = Move(target, before_min, after_min)
    if move.quality >= BALANCE_QUALITY:
        return None
    logger.info(
        "blocks %d:%d would lift the weakest block from %.1f to %.1f steps/s (quality %.2f < %.2f); "
        "servers per block now: %s",
        *target,
        before_min,
        after_min,
        move.quality,
        BALANCE_QUALITY,
        describe_coverage(with_us),
    )
    return move


def _own_record(per_block: list[list[ServerView]], own_peer_id: str):
    """This server's freshest record in the look-up, or None."""
    mine = [v for views in per_block for v in views if v.record.peer_id == own_peer_id]
    return max(mine, key=lambda v: v.expiration_time).record if mine else None


def _with_joining_as(
    blocks: list[BlockCoverage], per_block: list[list[ServerView]], peers: Peers, speed: float
) -> list[BlockCoverage]:
    """``blocks`` with each JOINING server that announced no speed credited with ``speed`` per block."""
    credit = [0.0] * len(blocks)
    for block in range(len(blocks)):
        joining = {
            v.record.peer_id
            for v in (per_block[block] if block < len(per_block) else [])
            if peers.counts(v.record)
            and v.record.state == ServerState.JOINING.value
            and v.record.throughput == 0
            and v.record.start <= block < v.record.end
        }
        credit[block] = speed * len(joining)
    return [BlockCoverage(c.servers, c.steps_per_s + extra) for c, extra in zip(blocks, credit, strict=True)]
