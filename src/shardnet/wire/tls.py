"""TLS channels pinned to the certificate a server announced.

A server with TLS on publishes the SHA-256 fingerprint of its certificate in its DHT record, which its
owner's key signs (``dht/records.py``). A client, or a server pushing to the next one, dials it with
``pinned_channel``: it reads the certificate the server presents, refuses the server if that
certificate's fingerprint is not the announced one (``ServerIdentityError``), and otherwise opens a
gRPC TLS channel that trusts that one certificate only. A server that does not hold the announced
certificate's private key cannot finish the handshake, so the client knows it talks to the server
that announced itself, and what travels (activations included) is encrypted.

Host names play no part: the trust is the pinned certificate, so the channel checks the name the
certificate itself carries (``grpc.ssl_target_name_override``), whatever address it was dialed at.
"""

from __future__ import annotations

import hashlib
import ssl

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from shardnet.errors import ServerIdentityError, ServerUnavailableError

FETCH_TIMEOUT_S = 10.0


def fingerprint(certificate_pem: bytes) -> str:
    """SHA-256 of the certificate's DER bytes, as 64 hex digits."""
    der = ssl.PEM_cert_to_DER_cert(certificate_pem.decode("ascii"))
    return hashlib.sha256(der).hexdigest()


def certificate_name(certificate_pem: bytes) -> str:
    """The first DNS name of the certificate, else its common name: what TLS checks the peer against."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        if dns:
            return dns[0]
    except x509.ExtensionNotFound:
        pass
    common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not common:
        raise ServerIdentityError("the server's certificate names nothing (no DNS name, no common name)")
    return str(common[0].value)


def presented_certificate(address: str, timeout_s: float = FETCH_TIMEOUT_S) -> bytes:
    """The certificate the server at host:port presents, as PEM (read without trusting it)."""
    host, _, port = address.rpartition(":")
    try:
        return ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=timeout_s).encode("ascii")
    except (OSError, ValueError) as exc:
        raise ServerUnavailableError(f"{address}: cannot read its TLS certificate ({exc})") from None


def pinned_channel(address: str, expected: str, options: list[tuple[str, object]]) -> grpc.Channel:
    """A TLS channel to ``address`` that trusts only a certificate whose fingerprint is ``expected``."""
    certificate = presented_certificate(address)
    presented = fingerprint(certificate)
    if presented != expected:
        raise ServerIdentityError(
            f"{address} presents TLS certificate {presented[:16]}..., not the {expected[:16]}... it announced: "
            "not the server that announced itself (or it changed its certificate since)"
        )
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
    name = certificate_name(certificate)
    return grpc.secure_channel(
        address, credentials, options=[*options, ("grpc.ssl_target_name_override", name)]
    )
