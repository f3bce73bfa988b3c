"""Links that break on a swarm of emulated hosts (``shardnet/netns.py``): the DHT and four servers (two
replicas of each of two spans) each in a network namespace of its own; this process is the client, on
the bridge. Push is on and every client setting is the default.

- A server loses its link to both holders of the next span mid-generation (the client still reaches
  everyone): the push fails within its acknowledgement deadline, the client delivers that step itself
  and stops pushing over the link; the tokens stay exact and no server is banned.
- The client loses its link to the route's last server: that hop runs past its budget, is hedged on
  the other replica, and the tokens stay exact.

Wall-clock bounds here are loose on purpose (they fail only when the client waits for a request
timeout); ``benchmarks/fault_latency.py`` measures the added time. Needs root and iproute2.
"""

from __future__ import annotations

import time

import pytest
import torch

from shardnet import ShardedModel
from shardnet.client.trust import ServerTrust
from shardnet.launch import listening_ports
from shardnet.netns import HostNetwork, available

from .conftest import OnToken, reference

pytestmark = pytest.mark.skipif(available() is not None, reason=f"no emulated hosts: {available()}")

NEW_TOKENS = 40
CUT_AT = 6  # the link breaks when the 6th token arrives


@pytest.fixture
def network(host_network):
    return host_network


@pytest.fixture
def swarm(hosts_swarm):
    return hosts_swarm


@pytest.fixture(scope="module")
def local(llama_untied):
    return reference(llama_untied)


def _host(network: HostNetwork, address: str):
    return next(host for host in network.hosts if host.address == address)


def _listening(swarm, record) -> bool:
    """Whether a running server of ``swarm`` is the one ``record`` announces (not a killed one's record)."""
    return (record.host, record.port) in {
        (swarm.host_of(process).address, port)
        for process in swarm.servers
        if process.poll() is None
        for port in listening_ports(process.pid)
    }


def _generate(model, ids, streamer=None) -> tuple[torch.Tensor, float]:
    began = time.monotonic()
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
    return out, time.monotonic() - began


def test_a_link_cut_between_two_servers_costs_one_delivered_step_and_bans_nobody(network, swarm, local):
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(21))
    want = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    health = ServerTrust.shared()
    cuts, involved = [], set()
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers) as model:
        clean, clean_s = _generate(model, ids)
        with model.inference_session(max_length=64) as session:

            def cut() -> None:
                record = session.route[0].server.record
                first = _host(network, record.host)
                involved.add(record.peer_id)
                for view in model.planner.view.snapshot().servers:
                    online = view.record.state == "online" and _listening(swarm, view.record)
                    if view.record.start == session.route[1].start and online:  # the next span's holders
                        cuts.append((first, _host(network, view.record.host)))
                        involved.add(view.record.peer_id)
                for a, b in cuts:
                    network.cut(a, b)

            before = health.counts()
            try:
                got, faulty_s = _generate(model, ids, OnToken(CUT_AT, cut))
            finally:
                for a, b in cuts:
                    network.restore(a, b)
            route = [hop.peer_id for hop in session.route]
            assert session.chain.pushing  # the route's servers push; only the cut link is avoided
            assert session.chain.failovers == 0  # nothing replayed: both servers kept their sessions
    counts = {key: value - before.get(key, 0) for key, value in health.counts().items()}
    assert len(cuts) == 2
    assert clean.tolist() == want.tolist() and got.tolist() == want.tolist()
    assert counts.get("broken_pushes", 0) == 1 and counts.get("delivered", 0) == 1
    assert counts.get("hedges", 0) == 0 and counts.get("failovers", 0) == 0
    assert not health.banned() & involved, "a server the client reaches was banned for a link"
    assert len(route) == 2
    assert faulty_s - clean_s < 30.0, f"a broken link cost {faulty_s - clean_s:.1f}s"


def test_a_link_cut_between_the_client_and_a_server_is_hedged_on_the_replica(network, swarm, local):
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(22))
    want = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    health = ServerTrust.shared()
    cut_off = []
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers) as model:
        clean, clean_s = _generate(model, ids)
        with model.inference_session(max_length=64) as session:

            def cut() -> None:
                record = session.route[1].server.record
                network.cut(network.bridge, _host(network, record.host))
                cut_off.append(record)

            before = health.counts()
            try:
                got, faulty_s = _generate(model, ids, OnToken(CUT_AT, cut))
            finally:
                for record in cut_off:
                    network.restore(network.bridge, _host(network, record.host))
            [unreachable] = cut_off
            assert unreachable.peer_id not in [hop.peer_id for hop in session.route]
            assert session.chain.failovers == 1
    counts = {key: value - before.get(key, 0) for key, value in health.counts().items()}
    assert clean.tolist() == want.tolist() and got.tolist() == want.tolist()
    assert counts.get("hedges", 0) == 1
    assert faulty_s - clean_s < 30.0, f"a cut client link cost {faulty_s - clean_s:.1f}s"
