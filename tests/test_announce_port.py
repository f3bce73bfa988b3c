"""`shardnet serve --announce-port`: the DHT record carries the port clients dial, and clients dial it.

One server listens on a port of its own and announces the port of a plain TCP forwarder in front of it
(a volunteer behind port forwarding); the other announces the port it listens on (the default).
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading

import pytest
import torch

from shardnet import ShardedModel
from shardnet.launch import LocalSwarm

from .conftest import free_port, reference, serving_process, shardnet_status


class _Forward(socketserver.BaseRequestHandler):
    """One connection: bytes both ways between the client and 127.0.0.1:target_port, until either closes."""

    def handle(self) -> None:
        self.server.connections += 1
        with socket.create_connection(("127.0.0.1", self.server.target_port), timeout=60) as upstream:
            back = threading.Thread(target=_pump, args=(upstream, self.request), daemon=True)
            back.start()
            _pump(self.request, upstream)
            back.join(timeout=10)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class Forwarder(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, target_port: int):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.target_port = target_port
        self.connections = 0  # accepted so far
        self.port = self.server_address[1]


@pytest.fixture(scope="module")
def forwarded_swarm(llama_untied, tmp_path_factory):
    listen_port = free_port()
    forwarder = Forwarder(listen_port)
    thread = threading.Thread(target=forwarder.serve_forever, daemon=True)
    thread.start()
    swarm = LocalSwarm(
        llama_untied,
        [(0, 3), (3, 6)],
        log_dir=tmp_path_factory.mktemp("announce_port_logs"),
        torch_threads=1,
        server_args=[["--port", str(listen_port), "--announce-port", str(forwarder.port)], []],
    )
    try:
        swarm.start(timeout_s=180)
        yield swarm, forwarder, listen_port
    finally:
        swarm.stop()
        forwarder.shutdown()
        forwarder.server_close()


def test_the_record_carries_the_announced_port_and_clients_dial_it(forwarded_swarm, llama_untied):
    swarm, forwarder, listen_port = forwarded_swarm
    servers = {s["span"]: s for s in json.loads(shardnet_status(swarm, "--json"))["servers"]}
    assert servers["0:3"]["address"] == f"127.0.0.1:{forwarder.port}"
    serving_process(swarm, listen_port)  # it listens on its --port, which nobody is told about
    with pytest.raises(LookupError):
        serving_process(swarm, forwarder.port)
    default_port = int(servers["3:6"]["address"].rsplit(":", 1)[1])  # no flag: the port it listens on
    serving_process(swarm, default_port)

    prompt = torch.tensor([[5, 17, 42, 9]])
    want = reference(llama_untied).generate(prompt, max_new_tokens=4, do_sample=False)
    with ShardedModel.from_pretrained(llama_untied, swarm.initial_peers) as model:
        got = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert got.tolist() == want.tolist()
    assert forwarder.connections >= 1  # the client reached 0:3 through the announced port
