"""Which blocks a ``--num-blocks N`` server takes: the span that most improves the swarm's weakest coverage.

A block's coverage is the number of servers that hold it (ONLINE or JOINING, so that servers starting
together see each other), then their summed speed on that block (a server announcing T whole-span
steps/s over n blocks runs one of its blocks n*T times a second; a JOINING server has measured nothing
yet and adds 0). Only servers a client could chain with ours count: same dtype, quantization and
protocol.

The choice is leximin: for every window of N consecutive blocks, add one server to its blocks and
sort the whole model's coverages from weakest up; take the window whose sorted list is greatest (it
lifts the weakest block, then the next weakest, ...), ties to the lowest start. On an empty 6-block
swarm, N=3 gives 0:3, and a second server then gets 3:6.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardnet.dht import ServerRecord, ServerState, ServerView

_COUNTED_STATES = frozenset({ServerState.ONLINE.value, ServerState.JOINING.value})


@dataclass(frozen=True, order=True)
class BlockCoverage:
    servers: int  # servers holding the block, ONLINE or JOINING
    steps_per_s: float  # their summed speed on this block alone (one block, batch 1), steps/s


@dataclass(frozen=True)
class Peers:
    """Which announced servers count: the ones a client could chain with ours."""

    dtype: str
    quant: str
    protocol: str
    own_peer_id: str | None = None  # our own record is left out (it does not need itself)

    def counts(self, record: ServerRecord) -> bool:
        return (
            record.state in _COUNTED_STATES
            and record.dtype == self.dtype
            and record.quant == self.quant
            and record.protocol == self.protocol
            and record.peer_id != self.own_peer_id
        )


def coverage(per_block: list[list[ServerView]], num_blocks: int, peers: Peers) -> list[BlockCoverage]:
    """Each block's coverage, from a look-up (per block, the servers announcing it)."""
    result = []
    for block in range(num_blocks):
        views = per_block[block] if block < len(per_block) else []
        holders = {}
        for view in views:
            record = view.record
            if peers.counts(record) and record.start <= block < record.end:
                holders[record.peer_id] = record  # one per server, even if it appears twice
        speed = sum(r.throughput * (r.end - r.start) for r in holders.values())
        result.append(BlockCoverage(len(holders), speed))
    return result


def choose_span(blocks: list[BlockCoverage], span_blocks: int) -> tuple[int, int]:
    """The half-open span of ``span_blocks`` blocks that most improves the weakest coverage (leximin)."""
    num_blocks = len(blocks)
    if not 1 <= span_blocks <= num_blocks:
        raise ValueError(f"cannot place {span_blocks} blocks in a model of {num_blocks}")
    best_start, best_key = 0, None
    for start in range(num_blocks - span_blocks + 1):
        after = [
            BlockCoverage(c.servers + 1, c.steps_per_s) if start <= i < start + span_blocks else c
            for i, c in enumerate(blocks)
        ]
        key = sorted(after)
        if best_key is None or key > best_key:  # strictly greater: ties keep the lower start
            best_start, best_key = start, key
    return best_start, best_start + span_blocks


def describe_coverage(blocks: list[BlockCoverage]) -> str:
    """Coverage for a log line: server counts per block, '0 0 0 1 1 1'."""
    return " ".join(str(c.servers) for c in blocks)
