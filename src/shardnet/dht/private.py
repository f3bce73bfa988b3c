"""DHT records of a private swarm: sealed with the swarm key, under names only members can compute.

hivemind 1.1.12 cannot close the DHT itself: its p2pd has no private-network (pre-shared key) option,
so anyone who knows a node's multiaddr can join the DHT, store values under any key and read any key
it can name. What a private swarm controls is its own records:

* **Names.** A record's key is ``<namespace>_b<block>``. In a private swarm the namespace is an HMAC of
  the model id under a key derived from the swarm key (``namespace``), so a stranger cannot even find
  the keys to read or write.
* **Sealing.** Every record a member stores is encrypted and authenticated with AES-256-GCM under
  another derived key (``SealedRecords``, a hivemind record validator). A member's node refuses to
  store, and its look-ups drop, any record that does not open under the key: a stranger can neither
  read a member's record (the server's address, span and load are inside) nor forge, overwrite or
  inject one. The record's DHT key and subkey are bound as associated data, so a sealed record copied
  under another key or subkey does not open either. Inside, the record is still signed by its owner's
  RSA key (hivemind's ``RSASignatureValidator``), so one member cannot overwrite another's record.

What a stranger can still do: connect to members' DHT ports and send them records, which they refuse
(a refused record is never stored), and store records on its own node. No one can delete a record in
hivemind; records expire by their own expiration time.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from shardnet.swarm_key import SwarmKey

_MAGIC = b"shardnet-sealed/1:"
_NONCE_BYTES = 12  # AES-GCM's standard nonce; random per record, 2^-32 collision odds after 2^32 records
_SEAL_LABEL = "dht-record"
_NAME_LABEL = "dht-namespace"


def namespace(model_id: str, swarm_key: SwarmKey | None) -> str:
    """The prefix of the model's DHT keys: the model id itself in a public swarm."""
    if swarm_key is None:
        return model_id
    digest = hmac.new(swarm_key.derive(_NAME_LABEL), model_id.encode(), hashlib.sha256).hexdigest()
    return f"private_{digest[:32]}"


class SealedRecords(RecordValidatorBase):
    """Seals every record this node stores and accepts only records sealed with the same swarm key."""

    def __init__(self, swarm_key: SwarmKey):
        self._aead = AESGCM(swarm_key.derive(_SEAL_LABEL))

    @staticmethod
    def _associated(record: DHTRecord) -> bytes:
        return len(record.key).to_bytes(4, "big") + record.key + (record.subkey or b"")

    def sign_value(self, record: DHTRecord) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _MAGIC + nonce + self._aead.encrypt(nonce, record.value, self._associated(record))

    def _open(self, record: DHTRecord) -> bytes | None:
        value = record.value
        if not value.startswith(_MAGIC) or len(value) < len(_MAGIC) + _NONCE_BYTES:
            return None
        nonce = value[len(_MAGIC) : len(_MAGIC) + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, value[len(_MAGIC) + _NONCE_BYTES :], self._associated(record))
        except InvalidTag:
            return None

    def validate(self, record: DHTRecord) -> bool:
        return self._open(record) is not None

    def strip_value(self, record: DHTRecord) -> bytes:
        opened = self._open(record)
        return record.value if opened is None else opened

    @property
    def priority(self) -> int:
        # Sealed last, opened first: above RSASignatureValidator (10), which then checks the plaintext.
        return 20

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SealedRecords)  # one swarm key per node
