"""Exact failover on real processes: servers killed with -9, frozen, or gone, mid-generation.

Each test starts its own swarm (servers die in it). The reference is local transformers' greedy
generate on the same input: a generation that failed over must give exactly the same tokens.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import psutil
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from shardnet import ShardedModel
from shardnet.errors import InvalidRequestError, RouteNotFoundError, SessionError, ShardnetError
from shardnet.launch import LocalSwarm
from shardnet.wire import pb, pb_grpc

from .conftest import OnToken, noisy_draft, prompt, reference, serving_process, shardnet_status, wait_gone

NEW_TOKENS = 20
KILL_AFTER = 5


@pytest.fixture(scope="module")
def local(llama_untied):
    return reference(llama_untied)


@pytest.fixture
def swarm(llama_untied, tmp_path):
    local_swarm = LocalSwarm(llama_untied, [(0, 3), (3, 6)], log_dir=tmp_path, torch_threads=1)
    local_swarm.start(timeout_s=180)
    yield local_swarm
    local_swarm.stop()


def _replace_then_kill(swarm: LocalSwarm, replacements: list[tuple[int, int]], victim):
    """Start replacement servers, wait until they are online, then SIGKILL ``victim`` (no goodbye)."""

    def action() -> None:
        for start, end in replacements:
            swarm.start_server(start, end)
        swarm.wait_ready(timeout_s=120)
        victim.kill()
        victim.wait(timeout=30)

    return action


@pytest.mark.parametrize("batch", [1, 2], ids=["batch1", "batch2_left_padded"])
def test_kill_9_after_5th_token_fails_over_to_a_wider_server(swarm, local, batch):
    ids, mask = prompt(batch)
    want = local.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    victim = swarm.servers[0]  # blocks 0:3
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers, request_timeout_s=20) as model:
        streamer = OnToken(KILL_AFTER, _replace_then_kill(swarm, [(0, 6)], victim))
        got = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer
        )
        route = model.last_route
    assert victim.poll() is not None and streamer.tokens == NEW_TOKENS
    assert got.tolist() == want.tolist()
    # Only the dead hop was re-routed: blocks 0:3 now run on part of the 0:6 server.
    assert [(hop.start, hop.end) for hop in route] == [(0, 3), (3, 6)]
    assert (route[0].server.record.start, route[0].server.record.end) == (0, 6)


@pytest.mark.slow  # before a release: pytest -m slow (README "Tests")
def test_failover_over_two_replacements_with_other_boundaries(swarm, local):
    ids, _ = prompt(1, seed=1)
    want = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    victim = swarm.servers[0]
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers, request_timeout_s=20) as model:
        streamer = OnToken(KILL_AFTER, _replace_then_kill(swarm, [(0, 2), (2, 5)], victim))
        got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        route = model.last_route
    assert got.tolist() == want.tolist()
    assert [(hop.start, hop.end) for hop in route] == [(0, 2), (2, 3), (3, 6)]
    assert [(hop.server.record.start, hop.server.record.end) for hop in route] == [(0, 2), (2, 5), (3, 6)]


def test_failover_inside_a_multi_call_inference_session(swarm, local):
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 256, (1, 6), generator=generator)
    more = torch.randint(3, 256, (1, 4), generator=generator)
    victim = swarm.servers[1]  # blocks 3:6, killed during the second call
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers, request_timeout_s=20) as model:
        with model.inference_session(max_length=64) as session:
            first = model.generate(prompt, max_new_tokens=8)
            streamer = OnToken(KILL_AFTER, _replace_then_kill(swarm, [(2, 6)], victim))
            second = model.generate(more, max_new_tokens=8, streamer=streamer)
            assert session.chain.failovers == 1
            assert [(hop.start, hop.end) for hop in session.route] == [(0, 3), (3, 6)]
    assert first.tolist() == local.generate(prompt, max_new_tokens=8, do_sample=False).tolist()
    concatenated = torch.cat([first, more], dim=1)
    want = local.generate(concatenated, max_new_tokens=8, do_sample=False)
    assert second[:, 4:].tolist() == want[:, concatenated.shape[1] :].tolist()


@pytest.mark.parametrize("push", [True, False], ids=["push", "client_chained"])
def test_server_that_stops_answering_is_timed_out_and_replaced(swarm, local, push):
    ids, _ = prompt(1, seed=3)
    want = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    swarm.start_server(3, 6)  # a replica of 3:6
    swarm.wait_ready(timeout_s=120)
    frozen = []
    connect = dict(request_timeout_s=3, push=push)
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers, **connect) as model:
        with model.inference_session(max_length=64) as session:

            def freeze_second_hop() -> None:
                process = serving_process(swarm, session.route[1].server.record.port)
                process.send_signal(signal.SIGSTOP)  # alive, connected, silent
                frozen.append((process, session.route[1].peer_id))

            try:
                got = model.generate(
                    ids, max_new_tokens=NEW_TOKENS, streamer=OnToken(KILL_AFTER, freeze_second_hop)
                )
            finally:
                for process, _ in frozen:
                    process.send_signal(signal.SIGCONT)
            [(_, frozen_peer)] = frozen
            assert session.route[1].peer_id != frozen_peer and session.chain.failovers == 1
    # the step that failed over still adds up: the frozen hop's part runs from its input being ready to
    # its replacement's output, the wait for the failure included (not lost between the hops' parts)
    [step] = [step for step in session.step_timings if any(hop.failed_over for hop in step.hops)]
    assert [hop.failed_over for hop in step.hops] == [False, True] and not step.pending
    assert step.hops[1].failover_s > 0.5 * step.step_s
    assert 0.9 <= step.critical_path_s / step.step_s <= 1.1, step.as_ms()
    assert got.tolist() == want.tolist()


class AtStep(LogitsProcessor):
    """Calls ``action`` once, when generate() processes the logits of its ``n``-th step: it works in
    every decoding mode, beam search included (which takes no streamer)."""

    def __init__(self, n: int, action):
        self.n, self.action, self.calls = n, action, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            self.action()
        return scores


def test_failover_during_beam_search_replays_the_reordered_beams(swarm, local):
    """Petals #503: after a failover the replacement must hold the beams' caches in their current order."""
    ids, mask = prompt(2, seed=8)
    beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=NEW_TOKENS)
    want = local.generate(ids, attention_mask=mask, **beams)
    victim = swarm.servers[0]
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers, request_timeout_s=20) as model:
        kill = AtStep(KILL_AFTER, _replace_then_kill(swarm, [(0, 6)], victim))
        got = model.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([kill]), **beams)
        route = model.last_route
    assert victim.poll() is not None
    assert (route[0].server.record.start, route[0].server.record.end) == (0, 6)
    assert got.tolist() == want.tolist()


def test_failover_during_assisted_decoding_replays_after_rollbacks(swarm, local):
    """Rejected draft tokens were rolled back on the servers; the replacement's replay must not hold them."""
    draft = noisy_draft(swarm.model_path)
    ids, _ = prompt(1, seed=9)
    want = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    victim = swarm.servers[1]
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers, request_timeout_s=20) as model:
        kill = AtStep(3, _replace_then_kill(swarm, [(3, 6)], victim))
        got = model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            assistant_model=draft,
            logits_processor=LogitsProcessorList([kill]),
        )
    assert victim.poll() is not None and kill.calls >= 3
    assert got.tolist() == want.tolist()


def test_no_holder_left_raises_a_route_error_naming_the_blocks(swarm):
    ids, _ = prompt(1, seed=4)
    victim = swarm.servers[1]

    def kill() -> None:
        victim.kill()
        victim.wait(timeout=30)

    with ShardedModel.from_pretrained(
        swarm.model_path, swarm.initial_peers, route_timeout_s=2, max_retries=2
    ) as model:
        with pytest.raises(RouteNotFoundError, match="3:6.*failed during this request"):
            model.generate(ids, max_new_tokens=NEW_TOKENS, streamer=OnToken(2, kill))


def test_a_bad_request_is_raised_at_once_without_failover(swarm):
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers) as model:
        session = model._open_chain(batch_size=1, max_length=8)
        try:
            with pytest.raises(InvalidRequestError, match="hidden_states shape"):
                session.step(torch.randn(1, 1, 65), None, torch.tensor([[0]]))  # hidden size is 64
            assert session.failovers == 0
            assert not model.health.banned() & {hop.peer_id for hop in session.route}
            session.step(torch.randn(1, 1, 64), None, torch.tensor([[0]]))  # nothing was held: it goes on
        finally:
            session.close()


def test_a_session_that_failed_midway_refuses_to_step_on(swarm):
    """A step raised after the first hop had run it (retries exhausted at the second): the hops disagree
    on what they hold, so the session refuses further steps instead of sending mismatched histories."""
    with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers, max_retries=0) as model:
        session = model._open_chain(batch_size=1, max_length=8)
        try:
            session.step(torch.randn(1, 2, 64), None, torch.tensor([[0, 1]]))
            serving_process(swarm, session.route[1].server.record.port).kill()
            with pytest.raises(ShardnetError):
                session.step(torch.randn(1, 1, 64), None, torch.tensor([[2]]))
            with pytest.raises(SessionError, match="open a new inference session"):
                session.step(torch.randn(1, 1, 64), None, torch.tensor([[2]]))
        finally:
            session.close()


@pytest.mark.slow  # before a release: pytest -m slow (README "Tests")
def test_group_sigterm_during_generation_drains_and_the_tokens_stay_the_same(llama_untied, local, tmp_path):
    """Ctrl-C / systemctl-style stop of a server in use: it drains, the session moves to a replica (handed
    over by the draining server, or failed over by the client when the drain ends), the tokens are those
    of a run without the stop, and nothing of the server remains."""
    drain_s = 3.0
    swarm = LocalSwarm(
        llama_untied,
        [(0, 3), (3, 6), (3, 6)],
        log_dir=tmp_path,
        torch_threads=1,
        extra_args=["--drain-timeout", str(drain_s)],
    )
    swarm.start(timeout_s=180)
    try:
        ids, _ = prompt(1, seed=6)
        new_tokens = 40
        want = local.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        stopped = {}
        with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers) as model:
            with model.inference_session(max_length=64) as session:

                class PacedStop(OnToken):
                    """Stops the 3:6 server in use after the 5th token, then paces like a slow reader so
                    the drain timeout passes mid-generation."""

                    def put(self, value) -> None:
                        super().put(value)
                        if self.tokens > KILL_AFTER:
                            time.sleep(0.15)

                def stop_second_hop() -> None:
                    hop = session.route[1]
                    process = serving_process(swarm, hop.server.record.port)
                    tree = [
                        psutil.Process(process.pid),
                        *psutil.Process(process.pid).children(recursive=True),
                    ]
                    stopped.update(process=process, tree=tree, hop=hop, at=time.monotonic())
                    os.killpg(process.pid, signal.SIGTERM)  # its own session: the group is the server's

                got = model.generate(
                    ids, max_new_tokens=new_tokens, streamer=PacedStop(KILL_AFTER, stop_second_hop)
                )
                assert session.chain.failovers + session.chain.handoffs >= 1
                assert session.route[1].peer_id != stopped["hop"].peer_id
        assert got.tolist() == want.tolist()
        process = stopped["process"]
        assert process.wait(timeout=drain_s + 15) == 0
        assert time.monotonic() - stopped["at"] < drain_s + 15
        assert wait_gone(stopped["tree"]) == [], "processes of the stopped server still running"
        status = shardnet_status(swarm)
        address = stopped["hop"].server.address
        lines = [line for line in status.splitlines() if address in line]
        assert all("online" not in line for line in lines), status
    finally:
        swarm.stop()


def test_a_session_reclaimed_while_idle_is_reopened_transparently(llama_untied, local, tmp_path):
    """The server closes a session idle past --session-idle-timeout; the conversation goes on, exactly."""
    swarm = LocalSwarm(
        llama_untied, [(0, 6)], log_dir=tmp_path, torch_threads=1, extra_args=["--session-idle-timeout", "1"]
    )
    swarm.start(timeout_s=180)
    try:
        generator = torch.Generator().manual_seed(7)
        prompt = torch.randint(3, 256, (1, 6), generator=generator)
        more = torch.randint(3, 256, (1, 4), generator=generator)
        with ShardedModel.from_pretrained(swarm.model_path, swarm.initial_peers) as model:
            with model.inference_session(max_length=64) as session:
                first = model.generate(prompt, max_new_tokens=6)
                address = session.route[0].server.address
                with grpc.insecure_channel(address) as channel:
                    stub = pb_grpc.ShardStub(channel)
                    deadline = time.monotonic() + 60
                    while stub.Info(pb.InfoRequest(), timeout=10).open_sessions:
                        assert time.monotonic() < deadline, "the idle session was never reclaimed"
                        time.sleep(0.2)
                second = model.generate(more, max_new_tokens=6)
                assert session.chain.failovers == 1
    finally:
        swarm.stop()
    concatenated = torch.cat([first, more], dim=1)
    want = local.generate(concatenated, max_new_tokens=6, do_sample=False)
    assert second[:, 4:].tolist() == want[:, concatenated.shape[1] :].tolist()
