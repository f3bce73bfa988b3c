"""Typed errors shared by every layer.

Each error names the gRPC status it travels as (by name, so this module needs no grpc) and whether a
client may retry it elsewhere. ``shardnet.wire.status`` is the one place that maps them to and from gRPC.
"""

from __future__ import annotations


class ShardnetError(Exception):
    """Base of every error shardnet raises on purpose."""

    status_name = "INTERNAL"  # gRPC status code name this error travels as
    retryable = False  # True when another server (or a later try) may succeed


class ConfigError(ShardnetError, ValueError):
    """A user-supplied setting (flag, argument, model folder) is invalid; the message names it."""

    status_name = "INVALID_ARGUMENT"


class ModelLoadError(ConfigError):
    """The model folder is missing, unreadable or of an unsupported architecture."""


class DemoModelMissingError(ConfigError):
    """The package that embeds the demo model is not installed; the message says how to install it."""


class DHTStartError(ShardnetError):
    """The local DHT node's process did not come up in time (it died or hangs)."""

    retryable = True


class DHTLookupError(ShardnetError):
    """The local DHT node did not answer a look-up in time (stuck, overloaded or gone)."""

    status_name = "UNAVAILABLE"
    retryable = True


class InvalidRequestError(ShardnetError, ValueError):
    """A request is malformed: wrong shape, dtype, span, position or size. Never retried."""

    status_name = "INVALID_ARGUMENT"


class ModelMismatchError(InvalidRequestError):
    """The request names another model (or protocol version) than the server holds."""

    status_name = "FAILED_PRECONDITION"


class SessionError(ShardnetError):
    """A step arrived for a session that is not open (or in a state that cannot take it)."""

    status_name = "FAILED_PRECONDITION"


class CacheFullError(ShardnetError):
    """The server cannot reserve the KV cache (or session slot) a new session asks for."""

    status_name = "RESOURCE_EXHAUSTED"
    retryable = True


class ClientQuotaError(CacheFullError):
    """One client's share of a server (its sessions, cache tokens or request rate) is used up; other
    servers, or this one a little later, can still serve it."""


class MessageTooLargeError(InvalidRequestError):
    """A tensor would exceed the negotiated message size limit."""

    status_name = "RESOURCE_EXHAUSTED"


class ServerUnavailableError(ShardnetError):
    """The server is draining, stopping or unreachable."""

    status_name = "UNAVAILABLE"
    retryable = True


class ServerRestingError(ServerUnavailableError):
    """The server is resting (its owner's headroom policy): alive, holding no blocks, back later."""


class ServerIdentityError(ServerUnavailableError):
    """A TLS server's certificate is not the one its DHT record announced: it is not used."""


class SessionExpiredError(ShardnetError):
    """The server ended a session on its own (idle reclaim, or the end of its drain): open it again."""

    status_name = "CANCELLED"
    retryable = True


class StepTimeoutError(ServerUnavailableError):
    """A server did not answer one request within the client's per-request timeout."""

    status_name = "DEADLINE_EXCEEDED"


class RemoteError(ShardnetError):
    """A server failed in a way it did not type (an internal error on its side)."""

    status_name = "INTERNAL"
    retryable = True


class RouteNotFoundError(ShardnetError):
    """No chain of servers covers every block; the message names the missing blocks."""

    status_name = "UNAVAILABLE"
    retryable = True

    def __init__(self, model_id: str, missing_blocks: list[int], reason: str = ""):
        self.model_id = model_id
        self.missing_blocks = missing_blocks
        hint = f" ({reason})" if reason else ""
        super().__init__(
            f"no usable server for model {model_id} holds blocks {format_blocks(missing_blocks)}{hint}; "
            "start servers for them or check --initial-peers"
        )


class GenerationError(ShardnetError, ValueError):
    """An argument to generate() is invalid or unsupported."""

    status_name = "INVALID_ARGUMENT"


def format_blocks(blocks: list[int]) -> str:
    """Render sorted block indices as half-open ranges: [0, 1, 2, 5] -> '0:3, 5:6'."""
    parts, start, prev = [], None, None
    for block in sorted(blocks):
        if start is None:
            start = prev = block
        elif block == prev + 1:
            prev = block
        else:
            parts.append(f"{start}:{prev + 1}")
            start = prev = block
    if start is not None:
        parts.append(f"{start}:{prev + 1}")
    return ", ".join(parts)
