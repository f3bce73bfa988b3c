"""Where a ``--num-blocks`` server goes: a first look at the swarm, then one more once it has announced.

The first look (right after the DHT node is up) picks a span with ``block_choice``. The server then
announces JOINING for it at once and, after a short wait, looks again: a server that chose at the same
moment did not see ours, nor we its. If we see one now that was not there at our first look and has a
lower peer id, it stays and we count it; if ours is the lower id, we stay and leave it out (it moves).
Two servers started together on an empty swarm so end up on different spans.

The wait must cover the time between another server's look and its announcement; it is taken as twice
our own (first look to announced), at least ``SETTLE_MIN_S``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import hivemind

from shardnet.dht import ServerView, lookup
from shardnet.server.block_choice import Peers, choose_span, coverage, describe_coverage

logger = logging.getLogger(__name__)
SETTLE_MIN_S = 2.0


@dataclass(frozen=True)
class FirstLook:
    span: tuple[int, int]  # chosen, half-open
    seen: frozenset[str]  # peer ids of the servers that counted at the first look
    looked_at: float  # time.monotonic() of the look


class Placement:
    def __init__(self, dht: hivemind.DHT, model_id: str, model_blocks: int, span_blocks: int, peers: Peers):
        self.dht = dht
        self.model_id = model_id
        self.model_blocks = model_blocks  # blocks of the whole model
        self.span_blocks = span_blocks  # blocks this server serves (--num-blocks)
        self.peers = peers

    def _look(self) -> list[list[ServerView]]:
        return lookup(self.dht, self.model_id, self.model_blocks)

    def first_look(self) -> FirstLook:
        looked_at = time.monotonic()
        per_block = self._look()
        blocks = coverage(per_block, self.model_blocks, self.peers)
        span = choose_span(blocks, self.span_blocks)
        logger.info(
            "chose blocks %d:%d for --num-blocks %d; servers per block before: %s",
            *span,
            self.span_blocks,
            describe_coverage(blocks),
        )
        seen = frozenset(
            v.record.peer_id for views in per_block for v in views if self.peers.counts(v.record)
        )
        return FirstLook(span, seen, looked_at)

    def settle_delay_s(self, first: FirstLook) -> float:
        """How long to wait, once announced, before ``settle``."""
        return max(SETTLE_MIN_S, 2 * (time.monotonic() - first.looked_at))

    def settle(self, first: FirstLook, own_peer_id: str) -> tuple[int, int]:
        """The span to serve after the second look: ``first.span``, or another if a server that chose
        at the same moment (and has a lower peer id) took it."""
        return settled_span(self._look(), first, own_peer_id, self.peers, self.span_blocks)


def settled_span(
    per_block: list[list[ServerView]], first: FirstLook, own_peer_id: str, peers: Peers, span_blocks: int
) -> tuple[int, int]:
    """The second look's decision, from its look-up: servers that appeared since the first look count
    if their peer id is lower than ours (they stay), and are left out otherwise (they move)."""
    concurrent = {
        v.record.peer_id
        for views in per_block
        for v in views
        if peers.counts(v.record) and v.record.peer_id not in first.seen
    } - {own_peer_id}
    ignored = {own_peer_id} | {peer for peer in concurrent if peer > own_peer_id}
    peers = replace(peers, ignored=peers.ignored | ignored)
    blocks = coverage(per_block, len(per_block), peers)
    span = choose_span(blocks, span_blocks, keep=first.span)
    if span != first.span:
        logger.info(
            "moving to blocks %d:%d: servers that chose with us took %d:%d; servers per block: %s",
            *span,
            *first.span,
            describe_coverage(blocks),
        )
    return span
