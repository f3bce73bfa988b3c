"""What shardnet stores on the DHT: one key per block, one subkey per server, a ServerRecord value.

Keys are ``{model_id}_b{block}``; subkeys are the server's peer id followed by its RSA public key, so
hivemind's RSASignatureValidator lets only that server write them. The values are checked against
``ServerRecord`` by hivemind's SchemaValidator on every node, and parsed again on read: a malformed
record is dropped and logged at DEBUG, never raised into a caller.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import pydantic.v1 as pydantic  # hivemind's SchemaValidator speaks pydantic v1
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator, conbytes

logger = logging.getLogger(__name__)


class ServerState(str, enum.Enum):
    JOINING = "joining"  # loading weights; not routable yet
    ONLINE = "online"  # serving
    DRAINING = "draining"  # finishing open sessions, refusing new ones
    RESTING = "resting"  # alive but holding no blocks (its owner's headroom policy); not routable
    OFFLINE = "offline"  # gone (clean exit)


class ServerRecord(pydantic.BaseModel):
    """One server's announcement, the same under each block key it holds.

    Fields with a default were added after the first release: a record from an older server still parses.
    """

    # "resting" came with issue 21: a node of an older version refuses to store such a record, so its
    # last ONLINE record there expires instead (clients meanwhile get UNAVAILABLE from the server).
    state: pydantic.constr(strict=True, regex="^(joining|online|draining|resting|offline)$")
    peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)  # hivemind peer id, base58
    host: pydantic.constr(strict=True, min_length=1, max_length=255)  # gRPC host clients dial
    port: pydantic.conint(strict=True, ge=1, le=65535)  # gRPC port
    start: pydantic.conint(strict=True, ge=0)  # first block held (inclusive)
    end: pydantic.conint(strict=True, ge=1)  # one past the last block held
    dtype: pydantic.constr(strict=True, regex="^(float32|float16|bfloat16)$")  # compute dtype
    protocol: pydantic.constr(strict=True, max_length=32)  # wire protocol, e.g. "shardnet.v1"
    version: pydantic.constr(strict=True, max_length=32)  # shardnet package version
    throughput: pydantic.confloat(strict=True, ge=0.0)  # measured decode steps/sec of the whole span
    cache_tokens_free: pydantic.conint(strict=True, ge=0)  # free KV-cache budget, batch x positions
    cache_tokens_total: pydantic.conint(strict=True, ge=0) = 0  # whole KV-cache budget; 0 = not announced
    open_sessions: pydantic.conint(strict=True, ge=0) = 0  # inference sessions open now
    sessions_served: pydantic.conint(strict=True, ge=0) = 0  # sessions opened since the server started
    max_length: pydantic.conint(strict=True, ge=0) = 0  # longest session, positions; 0 = not announced
    max_batch_size: pydantic.conint(strict=True, ge=0) = 0  # largest batch accepted; 0 = not announced
    quant: pydantic.constr(strict=True, regex="^(none|int8|nf4)$") = "none"  # weight-only quantization
    push: pydantic.StrictBool = False  # passes step outputs on to the next server (Push rpc)
    # SHA-256 of the gRPC TLS certificate (hex); "" = plain gRPC. Clients pin it (wire/tls.py).
    tls_fingerprint: pydantic.constr(strict=True, regex="^([0-9a-f]{64})?$") = ""
    prefix_hits: pydantic.conint(strict=True, ge=0) = 0  # sessions that started from a kept prompt prefix
    prefix_tokens_reused: pydantic.conint(strict=True, ge=0) = 0  # prefill positions (x batch) they skipped
    # A short digest of each held block's weights as loaded (server/weight_identity.py); [] = not announced.
    weight_digests: pydantic.conlist(pydantic.constr(strict=True, regex="^[0-9a-f]{8}$"), max_items=4096) = []
    # LoRA adapters the server can run its blocks with (serve --adapters: each folder's name); [] = none.
    adapters: pydantic.conlist(
        pydantic.constr(strict=True, regex="^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"), max_items=64
    ) = []

    @pydantic.validator("weight_digests")
    def _one_digest_per_block(cls, digests: list, values: dict) -> list:  # noqa: N805
        if (
            digests
            and "start" in values
            and "end" in values
            and len(digests) != values["end"] - values["start"]
        ):
            raise ValueError("weight_digests must hold one digest per block of the span")
        return digests

    @pydantic.validator("end")
    def _end_after_start(cls, end: int, values: dict) -> int:  # noqa: N805
        if "start" in values and end <= values["start"]:
            raise ValueError("end must be greater than start")
        return end


@dataclass(frozen=True)
class ServerView:
    """A server as a client sees it after a look-up."""

    record: ServerRecord
    expiration_time: float  # DHT time the record expires at

    @property
    def address(self) -> str:
        return f"{self.record.host}:{self.record.port}"

    @property
    def short_id(self) -> str:
        return ".." + self.record.peer_id[-4:]


def block_key(model_id: str, block: int) -> str:
    return f"{model_id}_{_field(block)}"


def _field(block: int) -> str:
    return f"b{block}"


_OWNED_SUBKEY = conbytes(regex=rb"^[A-Za-z0-9]+" + RSASignatureValidator.PUBLIC_KEY_REGEX + rb"$")


def schema_validator(model_id: str, num_blocks: int) -> SchemaValidator:
    """A SchemaValidator for every block key of one model."""
    fields = {_field(block): (dict[_OWNED_SUBKEY, ServerRecord], None) for block in range(num_blocks)}
    schema = pydantic.create_model(f"BlocksOf_{model_id}", **fields)
    return SchemaValidator(schema, allow_extra_keys=True, prefix=model_id)


def parse_record(raw: object) -> ServerRecord | None:
    """A record read from the DHT, or None (logged at DEBUG) if it does not match the schema.

    Parsed once per distinct value: a look-up sees each server's record under every block of its span,
    and again at every refresh (``_PARSED``, bounded)."""
    try:
        key = tuple(sorted(raw.items())) if isinstance(raw, dict) else None
        hash(key)
    except TypeError:  # a value that is not flat: parsed (and refused) below, not remembered
        key = None
    if key is not None and key in _PARSED:
        return _PARSED[key]
    try:
        record = ServerRecord.parse_obj(raw)
    except (pydantic.ValidationError, TypeError) as exc:
        logger.debug("dropping malformed server record: %s", exc)
        record = None
    if key is not None:
        if len(_PARSED) >= _MAX_PARSED:
            _PARSED.clear()  # crude, but a swarm's records are far fewer than this
        _PARSED[key] = record
    return record


_MAX_PARSED = 1 << 14
_PARSED: dict[tuple, ServerRecord | None] = {}
