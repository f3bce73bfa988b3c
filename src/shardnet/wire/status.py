"""Typed errors <-> gRPC status codes: the one place that maps them, on both sides of the wire."""

from __future__ import annotations

import grpc

from shardnet import errors

# Which error a client raises for each status a server sends. Statuses not listed become RemoteError.
_ERROR_FOR_STATUS: dict[grpc.StatusCode, type[errors.ShardnetError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.SessionError,
    grpc.StatusCode.NOT_FOUND: errors.SessionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.CacheFullError,
    grpc.StatusCode.UNAVAILABLE: errors.ServerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.StepTimeoutError,
    grpc.StatusCode.CANCELLED: errors.SessionExpiredError,
}
_MISMATCH_PREFIX = "model mismatch: "


def status_for(error: errors.ShardnetError) -> tuple[grpc.StatusCode, str]:
    """The status code and details a server sends for ``error``."""
    code = getattr(grpc.StatusCode, error.status_name, grpc.StatusCode.INTERNAL)
    details = str(error)
    if isinstance(error, errors.ModelMismatchError):
        details = _MISMATCH_PREFIX + details
    return code, details


def error_from_rpc(exc: grpc.RpcError, peer: str) -> errors.ShardnetError:
    """The typed error a client raises for a failed call to ``peer``."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    if details.startswith(_MISMATCH_PREFIX):
        return errors.ModelMismatchError(f"{peer}: {details[len(_MISMATCH_PREFIX) :]}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message" in details.lower():
        return errors.MessageTooLargeError(f"{peer}: {details}")
    error_type = _ERROR_FOR_STATUS.get(code, errors.RemoteError)
    return error_type(f"{peer}: {details} ({code.name})")
