"""Servers and DHT nodes stop cleanly: a group signal drains, and nothing of a process outlives it.

Real processes on 127.0.0.1. Every process tree is recorded with psutil before the signal; a zombie
counts as gone (its parent, or init, has yet to reap it). Every test kills what it started.
"""

from __future__ import annotations

import os
import queue
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import psutil
import pytest
import torch

from shardnet.dht import ServerState, ServerView, lookup, start_dht
from shardnet.launch import LocalSwarm
from shardnet.wire import pb, pb_grpc
from shardnet.wire.tensors import serialize

from .conftest import still_running, wait_gone

DRAIN_S = 2.0  # --drain-timeout of the servers in these tests
EXIT_SLACK_S = 15.0  # a stopped server exits within its drain timeout plus this
GONE_S = 15.0  # after an exit or a SIGKILL, every recorded descendant is gone within this
HIDDEN = 64

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def swarm(llama_untied, tmp_path_factory) -> Iterator[LocalSwarm]:
    """A bootstrap DHT node only; each test starts (and ends) its own server."""
    local = LocalSwarm(llama_untied, [], log_dir=tmp_path_factory.mktemp("stopping_logs"), torch_threads=1)
    local.start_dht()
    yield local
    local.stop()


@pytest.fixture(scope="module")
def observer(swarm):
    """A client-mode DHT node in the test process, to see what servers announce."""
    dht = start_dht(swarm.initial_peers, client_mode=True)
    yield dht
    dht.shutdown()


def _kill_all(processes: list[psutil.Process]) -> None:
    for process in still_running(processes):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _tree(pid: int, timeout_s: float = 30.0) -> list[psutil.Process]:
    """The process and its descendants, once its DHT process and p2pd are among them."""
    root = psutil.Process(pid)
    deadline = time.monotonic() + timeout_s
    while True:
        children = root.children(recursive=True)
        names = {child.name() for child in children}
        if "p2pd" in names and any(name.startswith("python") for name in names):
            return [root, *children]
        assert time.monotonic() < deadline, f"no DHT process and p2pd under {pid}: {names}"
        time.sleep(0.1)


def _server_views(dht, swarm: LocalSwarm) -> dict[str, ServerView]:
    views = {}
    for block_views in lookup(dht, swarm.model_id, swarm.num_blocks):
        views |= {view.record.peer_id: view for view in block_views}
    return views


@contextmanager
def _server(
    swarm: LocalSwarm, observer, drain_s: float = DRAIN_S
) -> Iterator[tuple[subprocess.Popen, ServerView, list[psutil.Process]]]:
    """A 0:6 server: its process, its ONLINE DHT record, and its process tree; all killed at the end."""
    known = set(_server_views(observer, swarm))
    process = swarm.start_server(0, swarm.num_blocks, ["--drain-timeout", str(drain_s)])
    tree: list[psutil.Process] = [psutil.Process(process.pid)]
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"server exited with {process.returncode} while starting"
            fresh = [
                view
                for peer, view in _server_views(observer, swarm).items()
                if peer not in known and view.record.state == ServerState.ONLINE.value
            ]
            if fresh:
                break
            assert time.monotonic() < deadline, "the server did not come ONLINE"
            time.sleep(0.2)
        tree = _tree(process.pid)
        yield process, fresh[0], tree
    finally:
        _kill_all(tree)
        process.wait()
        swarm.servers.remove(process)


def _state_of(observer, swarm: LocalSwarm, peer_id: str) -> str | None:
    view = _server_views(observer, swarm).get(peer_id)
    return None if view is None else view.record.state


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_group_signal_drains_announces_offline_and_leaves_nothing(swarm, observer, sig):
    """As Ctrl-C at a terminal or `kill -TERM -PGID`: the DHT process and p2pd must outlive the drain."""
    with _server(swarm, observer) as (process, view, tree):
        os.killpg(process.pid, sig)  # LocalSwarm starts each server as its own process group
        assert process.wait(timeout=DRAIN_S + EXIT_SLACK_S) == 0
        assert wait_gone(tree) == []
        # OFFLINE reached the DHT, so p2pd was still working when the server announced it.
        assert _state_of(observer, swarm, view.record.peer_id) == ServerState.OFFLINE.value


def test_sigkill_of_server_ends_its_dht_process_and_p2pd(swarm, observer):
    with _server(swarm, observer) as (process, _, tree):
        process.kill()
        process.wait()
        assert wait_gone(tree) == []


def _read_line(process: subprocess.Popen, timeout_s: float = 60.0) -> str:
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    assert selector.select(timeout_s), f"{process.args} printed nothing in {timeout_s}s"
    return process.stdout.readline().strip()


@contextmanager
def _spawned(args: list[str]) -> Iterator[tuple[subprocess.Popen, list[psutil.Process]]]:
    """A child in its own process group that prints one line once its DHT node runs; and its tree."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, start_new_session=True)
    tree: list[psutil.Process] = [psutil.Process(process.pid)]
    try:
        assert _read_line(process), f"{args} exited with {process.poll()} before its DHT node ran"
        tree = _tree(process.pid)
        yield process, tree
    finally:
        _kill_all(tree)
        process.wait()
        process.stdout.close()


_CLIENT_NODE = """
import sys, threading
from shardnet.dht import start_dht
dht = start_dht(sys.argv[1:], client_mode=True)
print("running", flush=True)
threading.Event().wait()
"""


def _client_node(swarm: LocalSwarm) -> list[str]:
    return [sys.executable, "-c", _CLIENT_NODE, *swarm.initial_peers]


def _dht_node(swarm: LocalSwarm) -> list[str]:
    return [sys.executable, "-m", "shardnet", "dht", "--initial-peers", *swarm.initial_peers]


@pytest.mark.parametrize("node", [_dht_node, _client_node], ids=["shardnet_dht", "client_mode"])
def test_sigkill_of_dht_owner_leaves_nothing(swarm, node):
    with _spawned(node(swarm)) as (process, tree):
        process.kill()
        process.wait()
        assert wait_gone(tree) == []


def test_group_sigterm_stops_shardnet_dht_with_status_0(swarm):
    with _spawned(_dht_node(swarm)) as (process, tree):
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=EXIT_SLACK_S) == 0
        assert wait_gone(tree) == []


@pytest.mark.parametrize("node", [_dht_node, _client_node], ids=["server_mode", "client_mode"])
def test_p2pd_exits_when_its_dht_process_dies(swarm, node):
    """p2pd closes itself when hivemind's persistent control connection closes: proof that it cannot
    outlive its DHT process, however that process dies."""
    with _spawned(node(swarm)) as (_, tree):
        [dht_process] = [p for p in tree[1:] if p.name().startswith("python")]
        p2pd = [p for p in tree if p.name() == "p2pd"]
        dht_process.kill()
        assert wait_gone(p2pd) == []


class _Stream:
    """A raw Inference stream: requests through a queue, replies one at a time."""

    def __init__(self, stub):
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.responses = stub.Inference(iter(self.requests.get, None), timeout=60)

    def send(self, **kind) -> pb.InferenceResponse:
        self.requests.put(pb.InferenceRequest(**kind))
        return next(self.responses)

    def close(self) -> None:
        self.requests.put(None)
        self.responses.cancel()


def _open(swarm: LocalSwarm) -> dict:
    span = pb.Span(start=0, end=swarm.num_blocks)
    return dict(open=pb.OpenSession(model_id=swarm.model_id, span=span, max_length=32, batch_size=1))


def _step(position: int) -> dict:
    hidden = torch.randn(1, 1, HIDDEN)  # [batch, seq, hidden]
    return dict(step=pb.Step(step_id=position, position=position, hidden_states=serialize(hidden)))


def test_drain_keeps_open_sessions_refuses_new_ones_then_ends_them(swarm, observer):
    drain_s = 3.0  # room to check the drain from outside before it ends
    with _server(swarm, observer, drain_s) as (process, view, tree):
        channel = grpc.insecure_channel(view.address)
        stub = pb_grpc.ShardStub(channel)
        session, refused = _Stream(stub), _Stream(stub)
        try:
            session.send(**_open(swarm))
            assert session.send(**_step(0)).step.position == 1
            signalled = time.monotonic()
            os.killpg(process.pid, signal.SIGTERM)
            deadline = signalled + drain_s
            while stub.Info(pb.InfoRequest(), timeout=10).state != ServerState.DRAINING.value:
                assert time.monotonic() < deadline, "the server did not start draining"
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as new_session:
                refused.send(**_open(swarm))
            assert new_session.value.code() == grpc.StatusCode.UNAVAILABLE
            assert session.send(**_step(1)).step.position == 2  # the open session keeps stepping
            # Past the drain timeout the server ends the stream, and the client sees an error.
            with pytest.raises(grpc.RpcError) as ended:
                next(session.responses)
            assert ended.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - signalled >= drain_s * 0.9
        finally:
            session.close()
            refused.close()
            channel.close()
        assert process.wait(timeout=drain_s + EXIT_SLACK_S) == 0
        assert wait_gone(tree) == []
        assert _state_of(observer, swarm, view.record.peer_id) == ServerState.OFFLINE.value


def _unit_settings(path) -> list[tuple[str, str, bool]]:
    """(key, value, commented) for each setting of a systemd unit; continuation lines joined."""
    settings, commented, pending = [], False, ""
    for line in path.read_text().splitlines():
        if pending:
            pending += " " + line.strip()
        elif line.startswith("#"):
            commented = True
            continue
        elif "=" in line:
            pending = line
        else:
            commented = False
            continue
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        key, value = pending.split("=", 1)
        settings.append((key, value.strip(), commented))
        commented, pending = False, ""
    return settings


def test_systemd_unit_drains_within_its_stop_timeout():
    """servers/shardnet.service: every setting commented, ExecStart valid for our CLI, time to drain."""
    import shlex
    from pathlib import Path

    from shardnet.cli import build_parser

    unit = _unit_settings(Path(__file__).parents[1] / "servers" / "shardnet.service")
    assert [key for key, _, commented in unit if not commented] == []
    settings = dict((key, value) for key, value, _ in unit)
    args = build_parser().parse_args(shlex.split(settings["ExecStart"])[1:])
    assert args.command == "serve"
    assert float(settings["TimeoutStopSec"]) >= args.drain_timeout + EXIT_SLACK_S
    assert settings["KillMode"] == "control-group" and settings["KillSignal"] == "SIGTERM"
    assert settings["Restart"] == "on-failure"
    assert "$MAINPID" in settings["ExecStop"]  # the server is signalled alone, then awaited
