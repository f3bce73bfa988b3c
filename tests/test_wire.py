"""Tensors survive the wire bit for bit in every dtype; malformed tensors are typed errors."""

from __future__ import annotations

import pytest
import torch

from shardnet.errors import InvalidRequestError, MessageTooLargeError
from shardnet.wire import pb
from shardnet.wire.tensors import deserialize, serialize


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_round_trip_is_exact(dtype):
    tensor = torch.randn(2, 5, 7).to(dtype)  # [batch, seq, hidden]
    message = serialize(tensor)
    assert message.dtype == str(dtype).removeprefix("torch.") and list(message.shape) == [2, 5, 7]
    back = deserialize(pb.Tensor.FromString(message.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, tensor)


def test_int_bool_and_empty_round_trip():
    for tensor in (torch.arange(6).reshape(2, 3), torch.tensor([[True, False]]), torch.empty(0, 4)):
        assert torch.equal(deserialize(serialize(tensor)), tensor)


def test_non_contiguous_views_travel_as_their_values():
    tensor = torch.randn(4, 6).t()
    assert torch.equal(deserialize(serialize(tensor)), tensor)


@pytest.mark.parametrize(
    "message",
    [
        pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8),
        pb.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 15),
        pb.Tensor(dtype="float32", shape=[-1], data=b""),
        pb.Tensor(dtype="float32", shape=[1] * 9, data=b"\0" * 4),
        # no elements, but strides past int64: found by the long fuzz (tests/test_attack.py -m fuzz)
        pb.Tensor(dtype="float32", shape=[6890427, 3100095, 446506, 1445, 0], data=b""),
    ],
)
def test_malformed_tensors_are_invalid_requests(message):
    with pytest.raises(InvalidRequestError):
        deserialize(message)


def test_allowed_dtypes_are_enforced_and_size_limit_applies():
    with pytest.raises(InvalidRequestError):
        deserialize(serialize(torch.ones(2, dtype=torch.int64)), frozenset({"float32"}))
    with pytest.raises(MessageTooLargeError):
        serialize(torch.zeros(1024), max_bytes=1000)
