"""What ``shardnet status`` prints: the servers of a model and the blocks nobody serves, from one look-up.

Both forms take the look-up result (per block, the servers announcing it) as ``SwarmView.servers()``
returns it. A server appears under every block of its span; it is listed once, with its freshest record.
"""

from __future__ import annotations

from shardnet.client.swarm_view import distinct_servers
from shardnet.dht import ServerState, ServerView
from shardnet.errors import format_blocks


def unique_servers(per_block: list[list[ServerView]]) -> list[ServerView]:
    """Each server once (its freshest record), ordered by span then peer id."""
    return sorted(distinct_servers(per_block), key=lambda v: (v.record.start, v.record.end, v.record.peer_id))


def blocks_without_online_server(per_block: list[list[ServerView]], num_blocks: int) -> list[int]:
    return [
        block
        for block in range(num_blocks)
        if block >= len(per_block)
        or not any(v.record.state == ServerState.ONLINE.value for v in per_block[block])
    ]


def weights_that_differ(servers: list[ServerView]) -> set[str]:
    """Peer ids of the servers whose weight digest of some block differs from the one most holders of that
    block announce (of the same dtype and quantization; at least two agreeing, a strict majority)."""
    holders: dict[tuple, dict[str, set[str]]] = {}
    for view in servers:
        r = view.record
        for block, digest in zip(range(r.start, r.end), r.weight_digests, strict=False):
            holders.setdefault((block, r.dtype, r.quant), {}).setdefault(digest, set()).add(r.peer_id)
    differ = set()
    for by_digest in holders.values():
        counts = sorted((len(peers) for peers in by_digest.values()), reverse=True)
        if len(counts) < 2 or counts[0] < 2 or counts[0] == counts[1]:
            continue  # one digest, or no majority: nothing to tell
        majority = max(by_digest, key=lambda digest: len(by_digest[digest]))
        for digest, peers in by_digest.items():
            if digest != majority:
                differ |= peers
    return differ


def weights_state(view: ServerView, differ: set[str]) -> str:
    """``differs`` (not what most holders announce), ``ok``, or ``-`` (no digests announced)."""
    if view.record.peer_id in differ:
        return "differs"
    return "ok" if view.record.weight_digests else "-"


def server_entry(view: ServerView, differ: set[str] = frozenset()) -> dict:
    """One server as ``status --json`` prints it; ``differ``: ``weights_that_differ`` of all servers."""
    r = view.record
    return {
        "peer_id": r.peer_id,
        "address": view.address,
        "span": f"{r.start}:{r.end}",
        "state": r.state,
        "dtype": r.dtype,
        "throughput": r.throughput,  # decode steps/s of the whole span, measured at start
        "cache_tokens_free": r.cache_tokens_free,  # batch x positions
        "cache_tokens_total": r.cache_tokens_total,  # 0 = not announced (older server)
        "open_sessions": r.open_sessions,
        "sessions_served": r.sessions_served,
        "shardnet_version": r.version,  # the shardnet release the server runs
        "tls_fingerprint": r.tls_fingerprint,  # SHA-256 of its gRPC TLS certificate; "" = plain gRPC
        "prefix_hits": r.prefix_hits,  # sessions that started from a kept prompt prefix
        "prefix_tokens_reused": r.prefix_tokens_reused,  # prefill positions (x batch) those skipped
        "weight_digests": list(r.weight_digests),  # per block held: 8 hex digits of its weights as loaded
        "weights": weights_state(view, differ),  # "differs" from most holders of a block, "ok", or "-"
        "adapters": list(r.adapters),  # LoRA adapters it serves (serve --adapters)
    }


def status_document(
    per_block: list[list[ServerView]], model_id: str, num_blocks: int, architecture: str
) -> dict:
    """The JSON document of ``shardnet status --json``; ``architecture`` is the model's ``model_type``."""
    servers = unique_servers(per_block)
    differ = weights_that_differ(servers)
    return {
        "model_id": model_id,
        "architecture": architecture,
        "num_blocks": num_blocks,
        "servers": [server_entry(view, differ) for view in servers],
        "blocks_without_online_server": blocks_without_online_server(per_block, num_blocks),
    }


def render_table(per_block: list[list[ServerView]], model_id: str, num_blocks: int, architecture: str) -> str:
    """The table of ``shardnet status``; ``architecture`` is the model's ``model_type``."""
    servers = unique_servers(per_block)
    lines = [f"model {model_id} (architecture {architecture}): {num_blocks} blocks, {len(servers)} servers"]
    lines.append(
        f"{'peer':<8}{'address':<24}{'blocks':<10}{'state':<10}{'dtype':<10}{'steps/s':>9}"
        f"{'cache free':>18}{'open':>6}{'served':>8}  {'version':<10}{'tls':<5}weights"
    )
    differ = weights_that_differ(servers)
    for view in servers:
        r = view.record
        cache = (
            f"{r.cache_tokens_free}/{r.cache_tokens_total}"
            if r.cache_tokens_total
            else str(r.cache_tokens_free)
        )
        lines.append(
            f"{view.short_id:<8}{view.address:<24}{f'{r.start}:{r.end}':<10}{r.state:<10}{r.dtype:<10}"
            f"{r.throughput:>9.1f}{cache:>18}{r.open_sessions:>6}{r.sessions_served:>8}"
            f"  {r.version:<10}{'yes' if r.tls_fingerprint else 'no':<5}{weights_state(view, differ)}"
        )
    missing = blocks_without_online_server(per_block, num_blocks)
    lines.append(
        f"blocks with no online server: {format_blocks(missing)}" if missing else "all blocks covered"
    )
    return "\n".join(lines)
