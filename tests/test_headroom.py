"""The headroom policy on a real swarm: a server whose owner's file says 'no headroom' leaves (its
client's session goes on exactly on the other holder), announces 'resting', frees its weights, stays up,
and serves again once the file says so; a file wobbling between the two levels changes nothing."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import torch

from shardnet import ShardedModel
from shardnet.launch import LocalSwarm
from shardnet.wire import pb, pb_grpc

from .conftest import OnToken, make_llama, reference

# Wide blocks (13 MB each in float32), so a freed span shows in the server's memory: 40 MB for 0:3.
WIDE = dict(hidden_size=256, intermediate_size=4096, num_attention_heads=4, num_key_value_heads=2)
POLICY = ["--headroom-on", "0.6", "--headroom-off", "0.4", "--headroom-window", "2", "--drain-timeout", "3"]


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("wide_llama"), seed=3, **WIDE)


def _write(path: Path, value: float) -> None:
    """As an owner's adapter should: write aside, then rename over the file (never half a number)."""
    aside = path.with_suffix(".new")
    aside.write_text(f"{value}\n")
    os.replace(aside, path)


def _states(swarm: LocalSwarm) -> dict[int, str]:
    """gRPC port -> the state its server's freshest record announces."""
    from shardnet.dht import lookup

    freshest = {}
    for views in lookup(swarm._probe, swarm.model_id, swarm.num_blocks):
        for view in views:
            known = freshest.get(view.record.peer_id)
            if known is None or view.expiration_time > known.expiration_time:
                freshest[view.record.peer_id] = view
    return {view.record.port: view.record.state for view in freshest.values()}


def _wait_state(swarm: LocalSwarm, port: int, states: set[str], timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while (state := _states(swarm).get(port)) not in states:
        assert time.monotonic() < deadline, f"server :{port} is {state}, not {states} after {timeout_s}s"
        time.sleep(0.1)
    return state


def _ports_of(process) -> set[int]:
    """The ports a server process listens on (its gRPC port among them; its DHT node is a child)."""
    from shardnet.launch import listening_ports

    return listening_ports(process.pid)


def test_a_server_rests_on_low_headroom_and_returns_on_high(wide_llama, tmp_path):
    files = [tmp_path / "headroom_a", tmp_path / "headroom_b"]
    for path in files:
        _write(path, 0.5)
    args = [["--headroom-file", str(path), *POLICY] for path in files] + [[]]
    local = reference(wide_llama)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    want = local.generate(ids, max_new_tokens=24, do_sample=False)
    with LocalSwarm(
        wide_llama, [(0, 3), (0, 3), (3, 6)], log_dir=tmp_path, torch_threads=1, server_args=args
    ) as swarm:
        states = _states(swarm)
        file_of = {}  # gRPC port -> that server's headroom file
        for process, path in zip(swarm.servers[:2], files, strict=True):
            [port] = _ports_of(process) & set(states)
            file_of[port] = (path, process)

        # 1. Wobbling between the levels (mean ~0.5, between 0.4 and 0.6) changes nothing.
        stop = threading.Event()

        def wobble() -> None:
            value = 0.45
            while not stop.wait(1.0):
                value = 1.0 - value  # 0.45, 0.55, 0.45, ...
                for path in files:
                    _write(path, value)

        wobbler = threading.Thread(target=wobble, daemon=True)
        wobbler.start()
        try:
            deadline = time.monotonic() + 4.5  # two windows and more
            while time.monotonic() < deadline:
                assert {_states(swarm)[port] for port in file_of} == {"online"}
                time.sleep(0.25)
        finally:
            stop.set()
            wobbler.join()
        for path in files:
            _write(path, 0.5)

        # 2. The file of the server this session runs on drops to 0.1, mid-generation: it drains (the
        # session goes on elsewhere, exactly), rests and frees its weights.
        rested = []
        with ShardedModel.from_pretrained(wide_llama, swarm.initial_peers) as model:
            with model.inference_session(max_length=64) as session:

                def lower() -> None:
                    port = session.route[0].server.record.port
                    path, process = file_of[port]
                    rested.append((port, process, psutil.Process(process.pid).memory_info().rss))
                    _write(path, 0.1)
                    _wait_state(swarm, port, {"draining", "resting"})

                got = model.generate(ids, max_new_tokens=24, do_sample=False, streamer=OnToken(6, lower))
                assert session.route[0].server.record.port != rested[0][0]
        assert got.tolist() == want.tolist()
        [(port, process, rss_online)] = rested
        _wait_state(swarm, port, {"resting"})
        other = next(p for p in file_of if p != port)
        assert _states(swarm)[other] == "online"
        log = _log_of(tmp_path, port)
        assert "span collected=True" in log, log[-2000:]
        freed = psutil.Process(process.pid).memory_info().rss
        assert rss_online - freed > 20 * 2**20, f"RSS {rss_online / 2**20:.0f} -> {freed / 2**20:.0f} MiB"

        # Alive, and says why it takes no work.
        document = _status_json(swarm)
        assert {s["state"] for s in document["servers"] if s["address"].endswith(f":{port}")} == {"resting"}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ShardStub(channel)
            assert stub.Info(pb.InfoRequest(), timeout=10).state == "resting"
            with pytest.raises(grpc.RpcError) as refused:
                stub.Forward(pb.ForwardRequest(model_id=swarm.model_id), timeout=10)
            assert (
                refused.value.code() == grpc.StatusCode.UNAVAILABLE and "resting" in refused.value.details()
            )

        # 3. Headroom again: it loads and serves (the other 0:3 holder blocked, so it must be this one).
        _write(file_of[port][0], 0.9)
        _wait_state(swarm, port, {"online"})
        other_peer = _peer_of(swarm, other)
        with ShardedModel.from_pretrained(
            wide_llama, swarm.initial_peers, blocked_servers=[other_peer]
        ) as model:
            again = model.generate(ids, max_new_tokens=24, do_sample=False)
        assert again.tolist() == want.tolist()
        assert "serving again: blocks=0:3" in _log_of(tmp_path, port)


def _status_json(swarm: LocalSwarm) -> dict:
    """What `shardnet status --json` prints (its own document function, fed by our look-up: the
    command itself costs a Python start-up and a DHT node, seconds on a busy 2-core machine)."""
    from shardnet.client.swarm_status import status_document
    from shardnet.dht import lookup

    per_block = lookup(swarm._probe, swarm.model_id, swarm.num_blocks)
    return status_document(per_block, swarm.model_id, swarm.num_blocks, "llama")


def _peer_of(swarm: LocalSwarm, port: int) -> str:
    from shardnet.dht import lookup

    for views in lookup(swarm._probe, swarm.model_id, swarm.num_blocks):
        for view in views:
            if view.record.port == port:
                return view.record.peer_id
    raise LookupError(port)


def _log_of(log_dir: Path, port: int) -> str:
    """The log of the 0:3 server listening on ``port`` (server_0_3.log or server_0_3.1.log)."""
    for path in sorted(log_dir.glob("server_0_3*.log")):
        text = path.read_text()
        if f"grpc=127.0.0.1:{port} " in text:
            return text
    raise LookupError(port)
