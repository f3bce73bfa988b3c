"""Verdicts kept: each record is validated once, not at every look-up that sees it again.

A client's swarm view looks up every block every few seconds, and a server record sits under each block
of its span. Before this cache, each copy of each record was checked again on every look-up:
- in the DHT node's process, its RSA signature (a key parse and a verify), the sealing of a private
  swarm, and the pydantic schema of the whole block entry;
- in the client's process, the ``ServerRecord`` parse.

At 250 servers that was most of a look-up. A record that comes back unchanged has the same key, subkey,
expiration time and bytes, and so the same verdict. A changed record (a new state or load) carries a new
expiration time, since every announce re-signs. So each verdict is kept per (key, subkey, expiration,
value digest), in a bounded LRU.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase

MAX_VERDICTS = 1 << 16  # records remembered: 250 servers x 40 blocks is 10,000


class CachedValidation(RecordValidatorBase):
    """A DHT node's validators behind one cache of verdicts (hivemind's ``RecordValidatorBase``: checked on
    hivemind 1.1.12, whose ``CompositeValidator`` this wraps, signing and stripping unchanged)."""

    def __init__(self, validators: Iterable[RecordValidatorBase], max_verdicts: int = MAX_VERDICTS):
        self._inner = CompositeValidator(validators)
        self._verdicts: OrderedDict[tuple, bool] = OrderedDict()
        self._max = max_verdicts
        self.checked = 0  # records really validated (the rest were verdicts kept)

    def validate(self, record: DHTRecord) -> bool:
        digest = hashlib.blake2b(record.value, digest_size=16).digest()
        key = (record.key, record.subkey, record.expiration_time, digest)
        verdict = self._verdicts.get(key)
        if verdict is not None:
            self._verdicts.move_to_end(key)
            return verdict
        verdict = self._inner.validate(record)
        self.checked += 1
        self._verdicts[key] = verdict
        if len(self._verdicts) > self._max:
            self._verdicts.popitem(last=False)
        return verdict

    def sign_value(self, record: DHTRecord) -> bytes:
        return self._inner.sign_value(record)

    def strip_value(self, record: DHTRecord) -> bytes:
        return self._inner.strip_value(record)

    @property
    def priority(self) -> int:
        return 0

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False  # a node gets all its validators at once, in this wrapper
