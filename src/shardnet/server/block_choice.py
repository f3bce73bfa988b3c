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

Servers that look at the swarm at the same moment see none of each other and may choose the same
span. So a server looks again once it has announced itself (see ``server/placement.py``) and keeps
its span unless another span is strictly better by server counts alone (speeds change as JOINING
servers come ONLINE, and must not make a server move); of servers that chose together, the one with
the lowest peer id stays and the others move (``Peers.ignored`` leaves out the ones that should move).
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
    ignored: frozenset[str] = frozenset()  # peer ids left out: our own, and those that chose with us

    def counts(self, record: ServerRecord) -> bool:
        return (
            record.state in _COUNTED_STATES
            and record.dtype == self.dtype
            and record.quant == self.quant
            and record.protocol == self.protocol
            and record.peer_id not in self.ignored
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


def _after(blocks: list[BlockCoverage], start: int, span_blocks: int) -> list[BlockCoverage]:
    """The coverage, sorted from the weakest up, with one more server on start:start+span_blocks."""
    end = start + span_blocks
    return sorted(BlockCoverage(c.servers + (start <= i < end), c.steps_per_s) for i, c in enumerate(blocks))


def choose_span(
    blocks: list[BlockCoverage], span_blocks: int, keep: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The half-open span of ``span_blocks`` blocks that most improves the weakest coverage (leximin).

    With ``keep`` (a span already announced), that span stays unless another is strictly better when
    only server counts are compared.
    """
    num_blocks = len(blocks)
    if not 1 <= span_blocks <= num_blocks:
        raise ValueError(f"cannot place {span_blocks} blocks in a model of {num_blocks}")
    best_start, best_key = 0, None
    for start in range(num_blocks - span_blocks + 1):
        key = _after(blocks, start, span_blocks)
        if best_key is None or key > best_key:  # strictly greater: ties keep the lower start
            best_start, best_key = start, key
    if keep is not None and keep[1] - keep[0] == span_blocks:
        kept = [c.servers for c in _after(blocks, keep[0], span_blocks)]
        if not [c.servers for c in best_key] > kept:
            return keep
    return best_start, best_start + span_blocks


def describe_coverage(blocks: list[BlockCoverage]) -> str:
    """Coverage for a log line: server counts per block, '0 0 0 1 1 1'."""
    return " ".join(str(c.servers) for c in blocks)
