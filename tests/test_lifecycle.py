"""Server lifecycle on a real swarm: bfloat16 serving, clean SIGTERM exit, typed route errors."""

from __future__ import annotations

import signal

import pytest
import torch

from shardnet import ShardedModel
from shardnet.errors import RouteNotFoundError
from shardnet.launch import LocalSwarm

from .conftest import left_after_launcher_killed, reference


def test_bfloat16_swarm_generates_close_to_local(llama_untied, tmp_path):
    with LocalSwarm(
        llama_untied, [(0, 2), (2, 6)], dtype="bfloat16", log_dir=tmp_path, torch_threads=1
    ) as swarm:
        ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
        with ShardedModel.from_pretrained(llama_untied, swarm.initial_peers, dtype=torch.bfloat16) as model:
            logits = model(ids).logits
            out = model.generate(ids, max_new_tokens=5)
    local = reference(llama_untied).to(torch.bfloat16)
    with torch.no_grad():
        want = local(ids).logits
    assert logits.dtype == torch.bfloat16 and logits.shape == want.shape
    # bf16 kernels differ in rounding, not in meaning: stay close to transformers' bf16 logits.
    assert (logits.float() - want.float()).abs().max().item() < 0.25
    assert out.shape == (1, 13) and ((out >= 0) & (out < 256)).all()


def test_float32_client_never_uses_bfloat16_servers(llama_untied, tmp_path):
    with LocalSwarm(llama_untied, [(0, 6)], dtype="bfloat16", log_dir=tmp_path, torch_threads=1) as swarm:
        with ShardedModel.from_pretrained(llama_untied, swarm.initial_peers, route_timeout_s=1.0) as model:
            with pytest.raises(RouteNotFoundError, match="0:6"):
                model(torch.tensor([[5, 6, 7]]))


def test_sigterm_stops_server_cleanly_and_route_error_names_missing_blocks(llama_untied, tmp_path):
    with LocalSwarm(llama_untied, [(0, 3), (3, 6)], log_dir=tmp_path, torch_threads=1) as swarm:
        second = swarm.servers[1]
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        assert "shardnet server stopped" in (tmp_path / "server_3_6.log").read_text()
        with ShardedModel.from_pretrained(llama_untied, swarm.initial_peers, route_timeout_s=1.0) as model:
            with pytest.raises(RouteNotFoundError, match="3:6"):
                model(torch.tensor([[5, 6, 7]]))


_LAUNCHER = """
import sys, time
from shardnet.launch import LocalSwarm
swarm = LocalSwarm(sys.argv[1], [(0, 3), (3, 6)], torch_threads=1).start(timeout_s=180)
print(" ".join(str(p.pid) for p in [swarm.dht_process, *swarm.servers]), flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # before a release: pytest -m slow (README "Tests")
def test_swarm_children_exit_when_their_launcher_is_killed(llama_untied):
    """Children run in their own session (no Ctrl-C storm); SIGKILL of the launcher must still end them."""
    alive = left_after_launcher_killed(_LAUNCHER, str(llama_untied), count=3)
    assert not alive, f"orphaned after the launcher died: {[p.cmdline()[3:5] for p in alive]}"
