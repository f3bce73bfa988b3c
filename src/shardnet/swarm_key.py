"""A private swarm's shared secret: written by ``shardnet keygen``, read from a key file, and the keys
derived from it.

The file holds the secret as hex on one line (32 random bytes by default, at least 32). A file that
anyone but its owner may read or write is refused, as ssh refuses such a private key: a swarm key read
by another user of the machine lets that user into the swarm.

The secret itself is never used directly and never sent. Each use gets its own key, derived with
HMAC-SHA256 under a label (``derive``): gRPC call credentials (``wire/call_auth.py``) and DHT records
(``dht/private.py``) use different keys, so one can never stand in for the other.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from shardnet.errors import ConfigError

KEY_BYTES = 32  # what keygen writes, and the least a key file may hold
_OTHERS = stat.S_IRWXG | stat.S_IRWXO


class SwarmKey:
    """The secret shared by every member of a private swarm. Its repr never shows the secret."""

    def __init__(self, secret: bytes):
        if len(secret) < KEY_BYTES:
            raise ConfigError(
                f"a swarm key needs at least {KEY_BYTES} bytes (64 hex digits); got {len(secret)}"
            )
        self._secret = bytes(secret)

    @classmethod
    def generate(cls) -> SwarmKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_hex(cls, text: str) -> SwarmKey:
        """A key from its hex form (what a key file holds); surrounding whitespace is ignored."""
        try:
            secret = bytes.fromhex(text.strip())
        except ValueError:
            raise ConfigError("a swarm key must be hex digits (as `shardnet keygen` writes it)") from None
        return cls(secret)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SwarmKey:
        """Read a key file; refuse a missing file, one others may read or write, or one not holding a key."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise ConfigError(
                f"swarm key file {path} does not exist (write one with `shardnet keygen`)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read swarm key file {path}: {exc}") from None
        if mode & _OTHERS:
            raise ConfigError(
                f"swarm key file {path} is accessible to other users (mode {stat.S_IMODE(mode):o}); "
                f"make it private with: chmod 600 {path}"
            )
        try:
            return cls.from_hex(text)
        except ConfigError as exc:
            raise ConfigError(f"swarm key file {path}: {exc}") from None

    def write(self, path: str | os.PathLike) -> None:
        """Write the key as hex to a new file only its owner can read; never overwrite a file."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{path} already exists; keygen does not overwrite a key") from None
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {exc}") from None
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(self._secret.hex() + "\n")

    def derive(self, label: str) -> bytes:
        """A 32-byte key for one use, e.g. ``derive("grpc-call")``."""
        return hmac.new(self._secret, b"shardnet swarm key/" + label.encode(), hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "SwarmKey(<secret>)"
