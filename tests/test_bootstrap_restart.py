"""The DHT bootstrap node killed (-9) and restarted: generation goes on while it is down, and it comes
back at the same multiaddr (``shardnet dht --identity FILE --port P``), so servers started afterwards
with the same ``--initial-peers`` join, and new clients find every server."""

from __future__ import annotations

import torch

from shardnet import ShardedModel
from shardnet.launch import LocalSwarm

from .conftest import reference

NEW_TOKENS = 8


def test_a_restarted_bootstrap_node_keeps_its_address_and_the_swarm_goes_on(llama_untied, tmp_path):
    local = reference(llama_untied)
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(31))
    want = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    with LocalSwarm(llama_untied, [(0, 3), (3, 6)], log_dir=tmp_path, torch_threads=1) as swarm:
        maddr = swarm.initial_peers[0]
        with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers) as model:
            assert model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == want
            swarm.dht_process.kill()
            swarm.dht_process.wait(timeout=30)
            # Without the bootstrap node, the servers' and the client's own DHT nodes keep the swarm.
            assert model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == want
            assert swarm.restart_dht() == maddr
        swarm.start_server(0, 6)  # joins through the restarted node, with the same --initial-peers
        swarm.wait_ready(timeout_s=120)
        with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers) as model:
            spans = {(view.record.start, view.record.end) for view in model.planner.view.snapshot().servers}
            assert spans == {(0, 3), (3, 6), (0, 6)}
            assert model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == want
