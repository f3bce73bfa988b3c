"""The one way to open a channel to a server: plain or TLS pinned to its announced certificate
(``tls.py``), and in a private swarm with every call signed (``call_auth.py``)."""

from __future__ import annotations

import grpc

from shardnet.wire.call_auth import CallSigner, signed_channel
from shardnet.wire.tls import pinned_channel


def server_channel(
    address: str, options: list[tuple[str, object]], fingerprint: str = "", signer: CallSigner | None = None
) -> grpc.Channel:
    """A channel to the server at ``address`` that announced ``fingerprint`` ("" = no TLS)."""
    if fingerprint:
        channel = pinned_channel(address, fingerprint, options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return signed_channel(channel, signer, address)
