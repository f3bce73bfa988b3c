"""gRPC over TLS on real server processes: the certificate's fingerprint is announced in the signed DHT
record and pinned by clients and by servers pushing to each other."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from shardnet import ShardedModel
from shardnet.client.transport import Transport
from shardnet.dht import lookup
from shardnet.errors import ServerIdentityError
from shardnet.launch import LocalSwarm
from shardnet.server.tls import server_certificate
from shardnet.wire import pb, pb_grpc
from shardnet.wire.tls import fingerprint

from .conftest import reference


@pytest.fixture(scope="module")
def tls_swarm(llama_untied, tmp_path_factory):
    """Two TLS servers, each with the certificate it makes in its own state folder."""
    states = [tmp_path_factory.mktemp(f"state{i}") for i in range(2)]
    swarm = LocalSwarm(
        llama_untied,
        [(0, 3), (3, 6)],
        log_dir=tmp_path_factory.mktemp("tls_logs"),
        torch_threads=1,
        server_args=[["--tls", "--state-dir", str(state)] for state in states],
    )
    swarm.start(timeout_s=180)
    yield swarm, states
    swarm.stop()


def _views(swarm):
    found = lookup(swarm._probe, swarm.model_id, swarm.num_blocks)
    return {view.address: view for views in found for view in views}


def test_each_server_announces_the_fingerprint_of_the_certificate_it_keeps(tls_swarm):
    swarm, states = tls_swarm
    announced = {view.record.tls_fingerprint for view in _views(swarm).values()}
    kept = set()
    for state in states:
        key = state / "tls" / "key.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        kept.add(fingerprint((state / "tls" / "cert.pem").read_bytes()))
    assert announced == kept and len(kept) == 2


def test_generation_over_tls_with_push_is_exact(tls_swarm, llama_untied):
    swarm, _ = tls_swarm
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(4))
    expected = reference(llama_untied).generate(ids, max_new_tokens=10, do_sample=False)
    # max_retries=0: a refused TLS channel (client or push) fails the test instead of failing over
    with ShardedModel.from_pretrained(llama_untied, swarm.initial_peers, max_retries=0) as model:
        got = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert [(hop.start, hop.end) for hop in model.last_route] == [(0, 3), (3, 6)]
    assert torch.equal(got, expected)


def test_plain_grpc_to_a_tls_server_gets_nothing(tls_swarm):
    swarm, _ = tls_swarm
    address = next(iter(_views(swarm)))
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            pb_grpc.ShardStub(channel).Info(pb.InfoRequest(), timeout=5)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_server_presenting_another_certificate_is_refused(tls_swarm, tmp_path):
    swarm, _ = tls_swarm
    address, view = next(iter(_views(swarm).items()))
    transport = Transport(1 << 20)
    try:
        info = transport.stub(address, view.record.tls_fingerprint).Info(pb.InfoRequest(), timeout=10)
        assert info.model_id == swarm.model_id
        with pytest.raises(ServerIdentityError, match="not the server that announced itself"):
            transport.stub(address, "0" * 64)
        # An impostor at another address, with a certificate of its own, passed off as this server.
        certificate, key = server_certificate(None, None, tmp_path)
        impostor = grpc.server(ThreadPoolExecutor(1))
        port = impostor.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, certificate)]))
        impostor.start()
        try:
            with pytest.raises(ServerIdentityError):
                transport.stub(f"127.0.0.1:{port}", view.record.tls_fingerprint)
        finally:
            impostor.stop(None)
    finally:
        transport.close()


@pytest.mark.slow  # the default suite must stay under 10 minutes: README "Tests" says what covers it
def test_status_shows_which_servers_speak_tls(tls_swarm):
    import json

    from .conftest import shardnet_status

    swarm, _ = tls_swarm
    document = json.loads(shardnet_status(swarm, "--json"))
    assert {len(server["tls_fingerprint"]) for server in document["servers"]} == {64}
    rows = shardnet_status(swarm).splitlines()
    # the tls column, then weights (ok: both announce the same digests)
    assert rows[1].split()[-2:] == ["tls", "weights"]
    assert all(row.split()[-2:] == ["yes", "ok"] for row in rows[2:4])
