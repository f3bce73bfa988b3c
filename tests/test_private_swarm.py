"""Private swarms: a swarm key file, signed gRPC calls, sealed DHT records, on real processes.

Members (every node started with the key) generate exactly as local transformers does, with push on,
so server-to-server calls carry credentials too. Without the key every gRPC call is UNAUTHENTICATED
and the DHT shows nothing; a credential captured from a member is refused when replayed, fresh or
old; a stranger that learns the swarm's key names cannot announce a server into it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import grpc
import pytest
import torch

from shardnet import ShardedModel
from shardnet.dht import ServerRecord, lookup, start_dht
from shardnet.dht.swarm import announce
from shardnet.errors import ConfigError, RouteNotFoundError
from shardnet.launch import LocalSwarm
from shardnet.swarm_key import SwarmKey
from shardnet.version import __version__
from shardnet.wire import PROTOCOL_VERSION, pb, pb_grpc
from shardnet.wire.call_auth import HEADER, MAX_SKEW_S, CallSigner, CallVerifier

from .conftest import reference, shardnet_status

INFO = "/shardnet.v1.Shard/Info"


def _shardnet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardnet", *args], capture_output=True, text=True, timeout=120
    )


# ---- the key file ----


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path):
    path = tmp_path / "swarm.key"
    done = _shardnet("keygen", str(path))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text().strip()
    assert len(text) == 64 and int(text, 16) >= 0  # 32 random bytes as hex
    again = _shardnet("keygen", str(path))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert path.read_text().strip() == text
    assert SwarmKey.from_file(path).derive("x") != SwarmKey.generate().derive("x")


def test_key_files_others_can_read_short_or_missing_are_refused(tmp_path):
    path = tmp_path / "swarm.key"
    SwarmKey.generate().write(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        SwarmKey.from_file(path)
    short = tmp_path / "short.key"
    short.write_text("ab" * 16 + "\n")
    os.chmod(short, 0o600)
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        SwarmKey.from_file(short)
    with pytest.raises(ConfigError, match="hex"):
        SwarmKey.from_hex("not a key")
    done = _shardnet("dht", "--swarm-key-file", str(tmp_path / "missing.key"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"shardnet dht: error: swarm key file {tmp_path / 'missing.key'} does not exist "
        "(write one with `shardnet keygen`)"
    ]
    assert "secret" not in repr(SwarmKey.generate()).lower().replace("<secret>", "")


# ---- call credentials, checked in-process ----


def test_a_credential_is_good_once_for_its_server_method_and_key():
    key = SwarmKey.generate()
    now = [1000.0]
    verifier = CallVerifier(key, ["127.0.0.1:5000"], clock=lambda: now[0])
    signer = CallSigner(key, clock=lambda: now[0])
    credential = signer.credential("127.0.0.1:5000", INFO)
    assert verifier.refusal(credential, INFO) is None
    assert "already used" in verifier.refusal(credential, INFO)
    assert "another" in verifier.refusal(signer.credential("127.0.0.1:5001", INFO), INFO)
    assert "another" in verifier.refusal(signer.credential("127.0.0.1:5000", INFO), "/shardnet.v1.Shard/Step")
    stranger = CallSigner(SwarmKey.generate(), clock=lambda: now[0])
    assert "another" in verifier.refusal(stranger.credential("127.0.0.1:5000", INFO), INFO)
    old = signer.credential("127.0.0.1:5000", INFO)
    now[0] += MAX_SKEW_S + 1
    assert "expired" in verifier.refusal(old, INFO)
    assert "need its swarm key" in verifier.refusal(None, INFO)
    for malformed in ("", "v1", "v1.x.y.z", "v2.1.2.3", "v1.1.2.3.4"):
        assert "malformed" in verifier.refusal(malformed, INFO)


# ---- a real private swarm ----


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "swarm.key"
    SwarmKey.generate().write(path)
    return path


@pytest.fixture(scope="module")
def private_swarm(llama_untied, key_file, tmp_path_factory):
    swarm = LocalSwarm(
        llama_untied,
        [(0, 3), (3, 6)],
        log_dir=tmp_path_factory.mktemp("private_logs"),
        torch_threads=1,
        swarm_key_file=key_file,
    )
    swarm.start(timeout_s=180)
    yield swarm
    swarm.stop()


def _addresses(swarm: LocalSwarm) -> list[str]:
    found = lookup(swarm._probe, swarm.model_id, swarm.num_blocks)
    return sorted({view.address for views in found for view in views})


def test_members_generate_exactly_with_push(private_swarm, key_file, llama_untied):
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    expected = reference(llama_untied).generate(ids, max_new_tokens=12, do_sample=False)
    model = ShardedModel.from_pretrained(
        llama_untied,
        private_swarm.initial_peers,
        swarm_key=key_file.read_text().strip(),
        max_retries=0,  # a refused call (or push) between members fails the test instead of failing over
    )
    try:
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert [(hop.start, hop.end) for hop in model.last_route] == [(0, 3), (3, 6)]
    finally:
        model.close()
    assert torch.equal(got, expected)


def test_without_the_key_every_call_is_unauthenticated(private_swarm):
    addresses = _addresses(private_swarm)
    assert len(addresses) == 2
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.ShardStub(channel)
            calls = (
                (stub.Info, pb.InfoRequest()),
                (stub.Forward, pb.ForwardRequest()),
                (stub.Inference, iter([pb.InferenceRequest()])),
                (stub.Push, pb.PushRequest()),
            )
            for method, request in calls:
                with pytest.raises(grpc.RpcError) as refused:
                    reply = method(request, timeout=10)
                    list(reply) if method is stub.Inference else reply  # a stream fails as it is read
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "private swarm" in refused.value.details()


def test_a_captured_credential_is_refused_when_replayed_now_or_later(private_swarm, key_file):
    key = SwarmKey.from_file(key_file)
    address = _addresses(private_swarm)[0]
    captured = CallSigner(key).credential(address, INFO)
    stale = CallSigner(key, clock=lambda: time.time() - MAX_SKEW_S - 60).credential(address, INFO)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ShardStub(channel)
        info = stub.Info(pb.InfoRequest(), metadata=[(HEADER, captured)], timeout=10)
        assert info.model_id == private_swarm.model_id  # the member's own call went through
        for credential, reason in ((captured, "already used"), (stale, "expired")):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Info(pb.InfoRequest(), metadata=[(HEADER, credential)], timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reason in refused.value.details()


def test_strangers_see_no_records_and_cannot_announce_into_the_swarm(private_swarm, key_file, llama_untied):
    key = SwarmKey.from_file(key_file)
    model_id, blocks = private_swarm.model_id, private_swarm.num_blocks
    stranger = start_dht(private_swarm.initial_peers, model_id=model_id, num_blocks=blocks)
    other_swarm = start_dht(
        private_swarm.initial_peers, model_id=model_id, num_blocks=blocks, swarm_key=SwarmKey.generate()
    )
    try:
        # Under the public names there is nothing; under the private ones (if a stranger learned them)
        # only sealed records, which a keyless node refuses.
        assert lookup(stranger, model_id, blocks) == [[] for _ in range(blocks)]
        stranger.swarm_key = key  # names as the members' (the stranger still cannot seal)
        assert lookup(stranger, model_id, blocks) == [[] for _ in range(blocks)]
        assert lookup(other_swarm, model_id, blocks) == [[] for _ in range(blocks)]
        # Both try to announce a server for every block under the private names.
        for node, port in ((stranger, 1), (other_swarm, 2)):
            forged = ServerRecord(
                state="online",
                peer_id=node.peer_id.to_base58(),
                host="127.0.0.1",
                port=port,
                start=0,
                end=blocks,
                dtype="float32",
                protocol=PROTOCOL_VERSION,
                version=__version__,
                throughput=1e6,
                cache_tokens_free=1 << 20,
                push=True,
            )
            node.swarm_key = key
            announce(node, model_id, forged, ttl_s=60)
        members = [
            view.record.port for views in lookup(private_swarm._probe, model_id, blocks) for view in views
        ]
        assert sorted(set(members)) == sorted({int(a.rsplit(":", 1)[1]) for a in _addresses(private_swarm)})
        assert 1 not in members and 2 not in members
    finally:
        stranger.shutdown()
        other_swarm.shutdown()


def test_a_client_without_the_key_finds_no_route(private_swarm, llama_untied):
    model = ShardedModel.from_pretrained(llama_untied, private_swarm.initial_peers, route_timeout_s=3)
    try:
        with pytest.raises(RouteNotFoundError):
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    finally:
        model.close()


@pytest.mark.slow  # the default suite must stay under 10 minutes: README "Tests" says what covers it
def test_status_lists_the_servers_for_members_only(private_swarm, key_file):
    import json

    members = json.loads(shardnet_status(private_swarm, "--json", "--swarm-key-file", str(key_file)))
    strangers = json.loads(shardnet_status(private_swarm, "--json"))
    assert len(members["servers"]) == 2
    assert strangers["servers"] == []
