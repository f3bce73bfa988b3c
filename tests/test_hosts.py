"""A swarm on emulated hosts: the DHT, each server and a client each in a network namespace of their own
(``shardnet/netns.py``), joined by a bridge that this test process sits on as a client.

Greedy tokens must equal local transformers' from the bridge and from a client host, servers must
announce their hosts' addresses, a cut link must really stop TCP between two hosts (and only them)
until restored, and closing the network must leave no namespace, link, route or process behind. Needs
root and iproute2; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc
import psutil
import pytest
import torch

from shardnet import ShardedModel
from shardnet.launch import LocalSwarm
from shardnet.netns import NETNS_DIR, ROUTE_PROTO, HostNetwork, available
from shardnet.process_template import TemplateProcess
from shardnet.wire import pb, pb_grpc

from .conftest import REPLICA_SPANS, reference, wait_gone

pytestmark = pytest.mark.skipif(available() is not None, reason=f"no emulated hosts: {available()}")

NEW_TOKENS = 10


# Dials ADDRESS:PORT; prints "connected", "timeout" or the errno's name (e.g. EHOSTUNREACH).
DIAL = """
import errno, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except TimeoutError:
    print("timeout")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
"""

# A client on its own host: greedy tokens, the route's addresses and its network namespace, as JSON.
CLIENT = """
import json, os, sys
import torch
from shardnet import ShardedModel
path, prompt, new_tokens, peers = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
with ShardedModel.from_pretrained(path, peers) as model:
    out = model.generate(torch.tensor(prompt), max_new_tokens=new_tokens, do_sample=False)
    route = [hop.server.address for hop in model.last_route]
netns = os.stat("/proc/self/ns/net").st_ino
print(json.dumps({"tokens": out.tolist(), "route": route, "netns": netns}))
"""


@pytest.fixture
def network(host_network):
    return host_network


@pytest.fixture
def swarm(hosts_swarm):
    return hosts_swarm


@pytest.fixture(scope="module")
def local(llama_untied):
    return reference(llama_untied)


def _prompt() -> torch.Tensor:
    return torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))


def _dial(network: HostNetwork, host, address: str, port: int, timeout_s: float = 1.0) -> str:
    result = network.run(
        host, [sys.executable, "-c", DIAL, address, str(port), str(timeout_s)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _grpc_port(swarm: LocalSwarm, host) -> int:
    return next(port for address, port in swarm.online_addresses() if address == host.address)


def test_servers_announce_their_hosts_and_the_bridge_generates_exactly(swarm, network, local):
    dht_host = swarm.host_of(swarm.dht_process)
    server_hosts = [swarm.host_of(server) for server in swarm.servers]
    assert len({dht_host, *server_hosts}) == 1 + len(REPLICA_SPANS)  # every process on a host of its own
    assert all(host.netns is not None for host in [dht_host, *server_hosts])
    assert swarm.initial_peers[0].startswith(f"/ip4/{dht_host.address}/tcp/")
    announced = swarm.online_addresses()
    assert {address for address, _ in announced} == {host.address for host in server_hosts}
    assert len(announced) == len(REPLICA_SPANS)
    for process in [swarm.dht_process, *swarm.servers]:  # with its DHT process and p2pd
        tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
        assert set(tree) <= set(network.pids(swarm.host_of(process)))

    ids = _prompt()
    want = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers) as model:
        got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        route = [hop.server.record.host for hop in model.last_route]
    assert got.tolist() == want.tolist()
    assert len(route) == 2 and set(route) <= {host.address for host in server_hosts}


def test_a_client_on_its_own_host_generates_exactly(swarm, network, local, tmp_path):
    client = network.add_host()
    ids = _prompt()
    want = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    script, log = tmp_path / "client.py", tmp_path / "client.log"
    script.write_text(CLIENT)
    args = [str(swarm.model_path), json.dumps(ids.tolist()), str(NEW_TOKENS), *swarm.initial_peers]
    # Forked from LocalSwarm's process template (a fresh interpreter would spend ~5 CPU-s importing),
    # it enters the client's namespace first, as the swarm's processes do.
    process = TemplateProcess.shared().spawn(
        args, dict(os.environ), log, stdout_pipe=True, netns=client.netns, script=script
    )
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    with process.stdout:
        answer = json.loads(process.stdout.read().splitlines()[-1])
    assert answer["netns"] == os.stat(NETNS_DIR / client.netns).st_ino
    assert answer["tokens"] == want.tolist()
    hosts = {swarm.host_of(server).address for server in swarm.servers}
    assert {address.rsplit(":", 1)[0] for address in answer["route"]} <= hosts


def test_cut_stops_tcp_between_two_hosts_until_restored(swarm, network):
    a, b = swarm.host_of(swarm.servers[0]), swarm.host_of(swarm.servers[2])
    port_a, port_b = _grpc_port(swarm, a), _grpc_port(swarm, b)
    assert _dial(network, a, b.address, port_b) == "connected"
    try:
        network.cut(a, b)
        assert _dial(network, a, b.address, port_b) == "EHOSTUNREACH"  # refused at once by a's kernel
        assert _dial(network, b, a.address, port_a) == "EHOSTUNREACH"
        assert _dial(network, network.bridge, b.address, port_b) == "connected"  # other links stand
        assert _dial(network, network.bridge, a.address, port_a) == "connected"
        network.restore(a, b)
        assert _dial(network, a, b.address, port_b) == "connected"
        assert _dial(network, b, a.address, port_a) == "connected"

        network.cut(a, b, one_way=True)  # a cannot send to b; b's packets still reach a
        assert _dial(network, a, b.address, port_b) == "EHOSTUNREACH"
        assert _dial(network, b, a.address, port_a) == "timeout"  # b's SYN arrives, a's answer cannot leave
        network.restore(a, b)

        network.cut(a, b, route="drop")  # the packets leave and vanish, as across a WAN cut
        assert _dial(network, a, b.address, port_b) == "timeout"
        network.restore(a, b)
        assert _dial(network, a, b.address, port_b) == "connected"
    finally:
        network.heal()


def test_an_open_grpc_connection_hangs_across_a_cut_and_recovers(swarm, network):
    """What a broken link does to a channel already connected: calls hang to their deadline (nothing
    fails fast); a new connection is refused at once; after restore the old connection works again."""
    server = swarm.host_of(swarm.servers[1])
    address = f"{server.address}:{_grpc_port(swarm, server)}"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ShardStub(channel)
        stub.Info(pb.InfoRequest(), timeout=10)
        try:
            network.cut(network.bridge, server)
            with pytest.raises(grpc.RpcError) as hung:
                stub.Info(pb.InfoRequest(), timeout=1)
            assert hung.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # A second channel to the same address shares the first one's connection (gRPC's global
            # subchannel pool) and hangs too; one with a pool of its own dials, and is refused at once.
            own_pool = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(address, own_pool) as fresh, pytest.raises(grpc.RpcError) as refused:
                pb_grpc.ShardStub(fresh).Info(pb.InfoRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            network.restore(network.bridge, server)
        stub.Info(pb.InfoRequest(), timeout=30)


def test_a_server_killed_and_restarted_goes_back_on_its_host(swarm, network, local):
    victim = swarm.servers[0]
    host = swarm.host_of(victim)
    victim.kill()
    victim.wait(timeout=30)
    replacement = swarm.start_server(0, 3)
    swarm.wait_ready(timeout_s=120)  # it listens on a port the DHT shows ONLINE for that host's address
    assert swarm.host_of(replacement) == host and replacement.pid in network.pids(host)
    ids = _prompt()
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers) as model:
        got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert got.tolist() == local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


def test_a_process_started_afresh_runs_on_its_host_too(llama_untied, tmp_path):
    """Without the process template, LocalSwarm runs `ip netns exec NAME python -m shardnet ...`."""
    with HostNetwork() as network:
        swarm = LocalSwarm(llama_untied, [], log_dir=tmp_path, network=network, preloaded=False)
        try:
            swarm.start_dht()
            host = swarm.host_of(swarm.dht_process)
            assert swarm.initial_peers[0].startswith(f"/ip4/{host.address}/tcp/")
            assert swarm.dht_process.pid in network.pids(host)  # `ip netns exec` became the process
        finally:
            swarm.stop()


def _made_by(tag: str) -> list[str]:
    """Namespaces and links whose name starts with ``tag``."""
    names = os.listdir(NETNS_DIR) if NETNS_DIR.exists() else []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names += [line.split(":", 2)[1].strip().split("@")[0] for line in links.splitlines()]
    return [name for name in names if name.startswith(tag)]


def _in_root(subnet: int, *what: str) -> list[str]:
    """Lines of ``ip -4 -o WHAT`` in this (the root) namespace that name an address of ``10.213.subnet``."""
    text = subprocess.run(["ip", "-4", "-o", *what], capture_output=True, text=True, check=True).stdout
    return [line for line in text.splitlines() if f"10.213.{subnet}." in line]


def _cut_routes(subnet: int) -> list[str]:
    return _in_root(subnet, "route", "show", "table", "all", "proto", ROUTE_PROTO)


def test_close_leaves_nothing_even_with_the_swarm_still_running(llama_untied, tmp_path):
    network = HostNetwork()
    swarm = LocalSwarm(llama_untied, [(0, 6)], log_dir=tmp_path, torch_threads=1, network=network)
    try:
        swarm.start(timeout_s=180)
        extra = network.popen(network.add_host(), ["sh", "-c", "sleep 600 & sleep 600"])
        network.cut(network.bridge, swarm.host_of(swarm.servers[0]))  # a route in the root namespace
        processes = [psutil.Process(p.pid) for p in [swarm.dht_process, *swarm.servers]]
        processes += [child for process in processes for child in process.children(recursive=True)]
        assert len(processes) >= 6  # the DHT node and the server, each with its DHT process and p2pd
        processes.append(psutil.Process(extra.pid))
        assert set(_made_by(network.tag)) >= {host.netns for host in network.hosts}
    finally:
        network.close()  # before stop(): it must not need the swarm's help
        swarm.stop()
    assert wait_gone(processes, timeout_s=5) == []
    assert _made_by(network.tag) == []
    assert _in_root(network.subnet, "addr", "show") == [] and _cut_routes(network.subnet) == []
    extra.wait(timeout=5)


def test_a_new_network_removes_what_a_killed_process_left():
    script = (
        "import sys\n"
        "from shardnet.netns import HostNetwork\n"
        "net = HostNetwork(1)\n"
        "net.cut(net.bridge, net.hosts[0])\n"
        "sleeper = net.popen(net.hosts[0], ['sleep', '600'])\n"
        "print(net.tag, net.subnet, sleeper.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as owner:
        tag, subnet, pid = owner.stdout.readline().split()
        sleeper = psutil.Process(int(pid))
        owner.send_signal(signal.SIGKILL)  # no close(): everything it made stays behind
    assert len(_made_by(tag)) == 3 and _cut_routes(int(subnet))  # bridge, namespace, veth; a route
    with HostNetwork():
        assert _made_by(tag) == [] and _cut_routes(int(subnet)) == []
        assert wait_gone([sleeper], timeout_s=5) == []
