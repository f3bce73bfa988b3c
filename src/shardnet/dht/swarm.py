"""Start a hivemind DHT node with shardnet's validators; announce a span; look up every block.

Every node is a ``TetheredDHT`` (see ``dht/tether.py``): its process and p2pd never outlive the
process that started it, and signals to that process's group do not reach them.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from functools import partial

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from shardnet.dht.private import SealedRecords, namespace
from shardnet.dht.records import ServerRecord, ServerView, block_key, parse_record, schema_validator
from shardnet.dht.tether import TetheredDHT
from shardnet.dht.verdicts import CachedValidation
from shardnet.errors import ConfigError, DHTLookupError, DHTStartError
from shardnet.swarm_key import SwarmKey

logger = logging.getLogger(__name__)
LOOKUP_TIMEOUT_S = 60.0  # a look-up taking longer is treated as failed (the node is stuck or gone)
ANNOUNCE_TIMEOUT_S = 10.0  # a store taking longer went nowhere (p2pd killed?); the next one retries
_LIVENESS_CHECK_S = 0.5  # while waiting for the DHT process, check this often that it is still alive


def start_dht(
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    client_mode: bool = False,
    model_id: str | None = None,
    num_blocks: int | None = None,
    timeout_s: float = 120.0,
    swarm_key: SwarmKey | None = None,
    identity_path: str | None = None,
) -> hivemind.DHT:
    """Start a DHT node (in its own process, as hivemind does) that signs and schema-checks records;
    with a swarm key, one of a private swarm (``dht/private.py``): it seals its records and accepts
    only sealed ones. ``identity_path``: the node's private key file (written if missing), so a node
    restarted on the same port has the same multiaddr and its peers' ``--initial-peers`` stay valid.

    hivemind forks that process: call this before creating any gRPC server or channel in the process,
    since a fork taken while gRPC's threads run can leave the child dead or deadlocked.
    """
    validators: list = [RSASignatureValidator()]
    if model_id is not None and num_blocks is not None:
        validators.append(schema_validator(namespace(model_id, swarm_key), num_blocks))
    if swarm_key is not None:
        validators.append(SealedRecords(swarm_key))
    dht = TetheredDHT(
        initial_peers=list(initial_peers),
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        client_mode=client_mode,
        record_validators=[CachedValidation(validators)],
        # Every look-up asks the network (``_get_many``), so a copy cached here is never read; and caching
        # on the nearest node sent every block's whole record set to a peer after each look-up, which
        # validated and stored it again (checked on hivemind 1.1.12).
        cache_locally=False,
        cache_nearest=0,
        start=False,
        **({"identity_path": str(identity_path)} if identity_path else {}),
    )
    dht.swarm_key = swarm_key  # names the model's keys in announce and lookup
    if not client_mode:
        # Python's collector touches every object it tracks: in the forked DHT process that copied the
        # inherited heap page by page (a server's DHT process held 123 MiB of its own). Frozen objects
        # are never scanned, so it keeps sharing them. A server's heap here is its imports, never
        # garbage; a client's may be anything (frozen cycles are never freed), so clients do not freeze.
        gc.freeze()
    try:
        dht.run_in_background(await_ready=True, timeout=timeout_s)
    except FutureTimeoutError:  # the node's process died or hangs: without a timeout we would wait forever
        dht.shutdown()
        raise DHTStartError(f"the DHT node did not start within {timeout_s:.0f}s") from None
    except Exception as exc:  # hivemind raises bare exceptions for unreachable peers and bad maddrs
        dht.shutdown()
        raise ConfigError(f"cannot start a DHT node with initial peers {list(initial_peers)}: {exc}") from exc
    return dht


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    return [str(maddr) for maddr in dht.get_visible_maddrs()]


def owned_subkey(dht: hivemind.DHT) -> bytes:
    """This node's subkey: its peer id followed by its public key, so only it can write the record."""
    return dht.peer_id.to_base58().encode() + RSASignatureValidator().local_public_key


def announce(
    dht: hivemind.DHT,
    model_id: str,
    record: ServerRecord,
    ttl_s: float,
    timeout_s: float = ANNOUNCE_TIMEOUT_S,
) -> bool:
    """Store ``record`` under every block key of its span; True if every store succeeded in timeout_s."""
    if not dht.is_alive():
        logger.warning(
            "DHT announce of blocks %d:%d skipped: the DHT process is gone", record.start, record.end
        )
        return False
    keys = _block_keys(dht, model_id, range(record.start, record.end))
    subkey = owned_subkey(dht)
    expiration = get_dht_time() + ttl_s
    future = dht.run_coroutine(
        partial(_store_many, keys, subkey, record.dict(), expiration), return_future=True
    )
    result = _result_while_alive(dht, future, timeout_s)
    if result is None:
        logger.warning("DHT announce of blocks %d:%d got no answer from the DHT", record.start, record.end)
        return False
    stored = all(result.values())
    if not stored:
        logger.warning("DHT announce of blocks %d:%d was not stored everywhere", record.start, record.end)
    return stored


def _block_keys(dht: hivemind.DHT, model_id: str, blocks: range) -> list[str]:
    prefix = namespace(model_id, getattr(dht, "swarm_key", None))
    return [block_key(prefix, block) for block in blocks]


def _result_while_alive(dht: hivemind.DHT, future, timeout_s: float):
    """The future's result; None after timeout_s, or as soon as the DHT process is found dead."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return future.result(timeout=min(_LIVENESS_CHECK_S, max(deadline - time.monotonic(), 0.0)))
        except FutureTimeoutError:
            if not dht.is_alive() or time.monotonic() >= deadline:
                return None


async def _store_many(keys: list[str], subkey: bytes, value: dict, expiration: float, _dht, node) -> dict:
    return await node.store_many(
        keys, [value] * len(keys), [expiration] * len(keys), subkeys=[subkey] * len(keys)
    )


async def _get_many(keys: list[str], _dht: hivemind.DHT, node) -> dict:
    # An infinite sufficient expiration = hivemind's `latest`: ask the network instead of a cached copy,
    # so state changes (JOINING -> ONLINE -> DRAINING) are seen at once.
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))


def _owned_by(subkey: object, record: ServerRecord) -> bool:
    """The subkey carries an owner key (so RSASignatureValidator checked the signature) and this peer id.

    Checked by the reader too, because a node that does not know this model (a bootstrap node) stores
    records without the schema check.
    """
    if not isinstance(subkey, bytes) or not subkey.startswith(record.peer_id.encode() + b"[owner:"):
        logger.debug("dropping record of %s: subkey is not owned by it", record.peer_id)
        return False
    return True


def lookup(
    dht: hivemind.DHT, model_id: str, num_blocks: int, timeout_s: float = LOOKUP_TIMEOUT_S
) -> list[list[ServerView]]:
    """For each block, the servers that announced it and whose record is valid and unexpired.

    Raises DHTLookupError if the DHT process gives no answer within ``timeout_s`` (or is gone), so a
    caller never waits forever on a stuck node.
    """
    keys = _block_keys(dht, model_id, range(num_blocks))
    future = dht.run_coroutine(partial(_get_many, keys), return_future=True)
    found = _result_while_alive(dht, future, timeout_s)
    if found is None:
        raise DHTLookupError(f"the DHT node gave no answer to a look-up of {model_id} within {timeout_s:g}s")
    now = get_dht_time()
    per_block: list[list[ServerView]] = []
    for key in keys:
        entry = found.get(key)
        views: list[ServerView] = []
        if entry is not None and isinstance(entry.value, dict):
            for subkey, item in entry.value.items():
                record = parse_record(getattr(item, "value", None))
                if record is not None and item.expiration_time > now and _owned_by(subkey, record):
                    views.append(ServerView(record=record, expiration_time=item.expiration_time))
        per_block.append(views)
    return per_block
