"""Call credentials of a private swarm: every gRPC call carries a one-time HMAC that only members can make.

A member signs each call (``CallSigner``) with a key derived from the swarm key: an HMAC-SHA256 over
the address it dials, the method, the time and a random nonce, sent in the ``x-shardnet-auth`` header.
The secret itself never leaves the machine. A server (``CallVerifier``) accepts a call only if

* the HMAC is right for one of its own announced addresses (so a credential made for another server,
  or under another key, is refused),
* its time is within ``MAX_SKEW_S`` of the server's clock (a credential captured earlier is refused
  once it is that old), and
* its nonce was not seen before (a credential replayed while still fresh is refused).

Anything else is refused with UNAUTHENTICATED and a message saying which check failed; calls of
servers to servers (push) carry credentials the same way. What this does not do is bind the call's
messages to the credential: without TLS, someone who can rewrite traffic in flight can change a call's
content, and can read it. TLS closes that.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable

import grpc

from shardnet.swarm_key import SwarmKey

HEADER = "x-shardnet-auth"
VERSION = "v1"
MAX_SKEW_S = 300.0  # how far a caller's clock may be from the server's (Kerberos' default skew)
NONCE_BYTES = 16
_KEY_LABEL = "grpc-call"  # SwarmKey.derive label of the key that signs calls
_MAX_NONCES = 1_000_000  # nonces remembered; beyond that, new calls are refused until old ones expire


def _mac(key: bytes, target: str, method: str, timestamp_ms: int, nonce: str) -> str:
    message = f"{VERSION}\n{target}\n{method}\n{timestamp_ms}\n{nonce}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


class CallSigner:
    """Makes the credential of one call to one server address."""

    def __init__(self, swarm_key: SwarmKey, clock: Callable[[], float] = time.time):
        self._key = swarm_key.derive(_KEY_LABEL)
        self._clock = clock

    def credential(self, target: str, method: str) -> str:
        timestamp_ms = int(self._clock() * 1000)
        nonce = secrets.token_hex(NONCE_BYTES)
        return f"{VERSION}.{timestamp_ms}.{nonce}.{_mac(self._key, target, method, timestamp_ms, nonce)}"


class CallVerifier:
    """Checks a call's credential on a server; remembers nonces while they are fresh."""

    def __init__(
        self, swarm_key: SwarmKey, addresses: Iterable[str] = (), clock: Callable[[], float] = time.time
    ):
        self._key = swarm_key.derive(_KEY_LABEL)
        self._clock = clock
        self._addresses: tuple[str, ...] = tuple(addresses)
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()  # nonce -> expiry
        self._lock = threading.Lock()

    def set_addresses(self, addresses: Iterable[str]) -> None:
        """The host:port addresses callers dial (announced, and listening): credentials name one of them."""
        self._addresses = tuple(dict.fromkeys(addresses))

    def refusal(self, credential: str | None, method: str) -> str | None:
        """Why the call must be refused, or None if its credential is good (its nonce is then used up)."""
        if credential is None:
            return "this server belongs to a private swarm: calls need its swarm key (--swarm-key-file, swarm_key=)"
        parts = credential.split(".")
        if len(parts) != 4 or parts[0] != VERSION or not parts[1].isdigit():
            return "malformed swarm credential"
        _, timestamp_text, nonce, mac = parts
        timestamp_ms = int(timestamp_text)
        if not any(
            hmac.compare_digest(mac, _mac(self._key, address, method, timestamp_ms, nonce))
            for address in self._addresses
        ):
            return "invalid swarm credential (another swarm key, or made for another server or method)"
        now = self._clock()
        if abs(now - timestamp_ms / 1000) > MAX_SKEW_S:
            return (
                f"expired swarm credential: made {now - timestamp_ms / 1000:+.0f} s from this server's clock "
                f"(at most {MAX_SKEW_S:.0f} s; replayed, or a clock is off)"
            )
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return "swarm credential already used (a replayed call)"
            if len(self._seen) >= _MAX_NONCES:
                return "too many calls in the last minutes to remember; try again later"
            self._seen[nonce] = now + 2 * MAX_SKEW_S  # past that its timestamp is refused anyway
        return None


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class SigningInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a fresh credential for ``target`` to every call of a channel (``grpc.intercept_channel``)."""

    def __init__(self, signer: CallSigner, target: str):
        self._signer = signer
        self._target = target

    def _signed(self, details: grpc.ClientCallDetails) -> _CallDetails:
        credential = self._signer.credential(self._target, _method_name(details.method))
        metadata = [*(details.metadata or ()), (HEADER, credential)]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._signed(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._signed(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._signed(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._signed(client_call_details), request_iterator)


def signed_channel(channel: grpc.Channel, signer: CallSigner | None, target: str) -> grpc.Channel:
    """``channel`` with every call signed for ``target``; unchanged when there is no signer (public swarm)."""
    return channel if signer is None else grpc.intercept_channel(channel, SigningInterceptor(signer, target))


class VerifyingInterceptor(grpc.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call whose credential ``verifier`` does not accept."""

    def __init__(self, verifier: CallVerifier):
        self._verifier = verifier

    def intercept_service(self, continuation, handler_call_details):
        method = _method_name(handler_call_details.method)
        credential = next(
            (value for key, value in handler_call_details.invocation_metadata or () if key == HEADER), None
        )
        refusal = self._verifier.refusal(credential if isinstance(credential, str) else None, method)
        handler = continuation(handler_call_details)
        if refusal is None:
            return handler
        return _refusing_handler(handler, refusal)


def _refusing_handler(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED at once."""

    def refuse(_request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    request_streaming = handler is not None and handler.request_streaming
    response_streaming = handler is not None and handler.response_streaming
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
