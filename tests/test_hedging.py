"""A server frozen in the route (SIGSTOP: alive, connected, silent) costs a generation one hedge, not the
request timeout: the client replays into a replica once the step runs past its budget, with default
settings (push on, request_timeout_s 120 s), and the tokens stay exact.

The bound asserted on the added time is loose on purpose (a quarter of the request timeout: it fails
only when the client waits for the timeout); ``benchmarks/fault_latency.py`` measures the figure.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch

from shardnet import ShardedModel
from shardnet.client.trust import ServerTrust

from .conftest import OnToken, reference, serving_process

NEW_TOKENS = 40
FREEZE_AT = 6  # the freeze comes when the 6th token arrives


@pytest.fixture(scope="module")
def local(llama_untied):
    return reference(llama_untied)


@pytest.mark.parametrize("hop", [0, 1], ids=["first_hop", "last_hop"])
def test_a_frozen_server_costs_one_hedge_and_the_tokens_stay_exact(replicas, local, hop):
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(hop))
    want = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    health = ServerTrust.shared()
    frozen = []
    with ShardedModel.from_pretrained(replicas.model_path, replicas.initial_peers) as model:
        began = time.monotonic()
        clean = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        clean_s = time.monotonic() - began
        with model.inference_session(max_length=64) as session:

            def freeze() -> None:
                record = session.route[hop].server.record
                process = serving_process(replicas, record.port)
                process.send_signal(signal.SIGSTOP)
                frozen.append((process, record.peer_id))

            before = health.counts()
            began = time.monotonic()
            try:
                got = model.generate(ids, max_new_tokens=NEW_TOKENS, streamer=OnToken(FREEZE_AT, freeze))
                faulty_s = time.monotonic() - began
            finally:
                for process, _ in frozen:
                    process.send_signal(signal.SIGCONT)
            [(_, frozen_peer)] = frozen
            assert frozen_peer not in [route_hop.peer_id for route_hop in session.route]
            assert session.chain.failovers == 1
    after = health.counts()
    assert clean.tolist() == want.tolist()
    assert got.tolist() == want.tolist()
    assert after.get("hedges", 0) - before.get("hedges", 0) == 1
    assert faulty_s - clean_s < 30.0, f"a frozen server cost {faulty_s - clean_s:.1f}s"
