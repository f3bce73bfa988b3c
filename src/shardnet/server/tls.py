"""A server's TLS certificate: the volunteer's own (``--tls-cert``/``--tls-key``), or one made at first
start (``--tls``) and kept in the server's state folder, so its fingerprint stays the same across
restarts and clients keep trusting it.

The made certificate is self-signed, an ECDSA P-256 key and a name that is not a host
(``shardnet-server``): clients trust it by the fingerprint the server announces (``wire/tls.py``), not
by a certificate authority or a host name. A key file other users may read is refused.
"""

from __future__ import annotations

import datetime
import logging
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shardnet.errors import ConfigError

logger = logging.getLogger(__name__)
CERTIFICATE_NAME = "shardnet-server"
VALID_DAYS = 3650
_OTHERS = stat.S_IRWXG | stat.S_IRWXO


def default_state_dir() -> Path:
    from platformdirs import user_state_path

    return user_state_path("shardnet")


def server_certificate(cert_file: Path | None, key_file: Path | None, state_dir: Path) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): the files given, else the state folder's, made if missing."""
    if cert_file is not None and key_file is not None:
        return _read(cert_file, "--tls-cert"), _read_key(key_file, "--tls-key")
    folder = state_dir / "tls"
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    if cert_path.exists() and key_path.exists():
        return _read(cert_path, "certificate"), _read_key(key_path, "TLS key")
    certificate, key = _self_signed()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(key_path, key, 0o600)
        _write(cert_path, certificate, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot keep a TLS certificate in {folder}: {exc} (see --state-dir)") from None
    logger.info("made a self-signed TLS certificate in %s", folder)
    return certificate, key


def _self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CERTIFICATE_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(CERTIFICATE_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None


def _read_key(path: Path, what: str) -> bytes:
    data = _read(path, what)
    mode = path.stat().st_mode
    if mode & _OTHERS:
        raise ConfigError(
            f"{what} {path} is accessible to other users (mode {stat.S_IMODE(mode):o}); "
            f"make it private with: chmod 600 {path}"
        )
    return data


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
