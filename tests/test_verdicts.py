"""Each DHT record is validated once per (key, subkey, expiration, value), and each record value parsed
once: a swarm view's look-ups every few seconds see the same records again (``dht/verdicts.py``)."""

from __future__ import annotations

from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from shardnet.dht.records import parse_record
from shardnet.dht.verdicts import CachedValidation


class Counting(RecordValidatorBase):
    """Accepts values that start with b"ok", and counts what it was asked."""

    def __init__(self):
        self.asked = 0

    def validate(self, record: DHTRecord) -> bool:
        self.asked += 1
        return record.value.startswith(b"ok")


def test_a_verdict_is_kept_until_the_record_changes():
    inner = Counting()
    cached = CachedValidation([inner], max_verdicts=3)
    record = DHTRecord(key=b"k", subkey=b"s", value=b"ok 1", expiration_time=10.0)
    assert all(cached.validate(record) for _ in range(5)) and inner.asked == 1
    forged = DHTRecord(key=b"k", subkey=b"s", value=b"no 1", expiration_time=10.0)  # same everything else
    assert not cached.validate(forged) and not cached.validate(forged) and inner.asked == 2
    renewed = DHTRecord(key=b"k", subkey=b"s", value=b"ok 1", expiration_time=20.0)  # a new announce
    assert cached.validate(renewed) and inner.asked == 3
    for i in range(3):  # the oldest verdicts make room
        cached.validate(DHTRecord(key=b"k", subkey=b"other", value=b"ok", expiration_time=float(i)))
    assert cached.validate(record) and inner.asked == 7


def test_a_record_value_is_parsed_once_and_a_bad_one_stays_refused():
    value = dict(
        state="online",
        peer_id="QmVerdicts",
        host="127.0.0.1",
        port=5000,
        start=0,
        end=3,
        dtype="float32",
        protocol="shardnet.v1",
        version="0.1.0",
        throughput=2.5,
        cache_tokens_free=100,
    )
    first = parse_record(value)
    assert first is not None and parse_record(dict(value)) is first
    assert parse_record({**value, "end": 0}) is None and parse_record({**value, "end": 0}) is None
    assert parse_record({**value, "port": [5000]}) is None  # not hashable: parsed, refused, not kept
