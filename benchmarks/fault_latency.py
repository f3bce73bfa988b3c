"""What one fault costs a generation: the time it adds, and whether the tokens stay exact.

    python benchmarks/fault_latency.py --model tiny --scenario freeze handoff replay --prompt-len 2000
    python benchmarks/fault_latency.py --hosts --scenario link_servers link_client

A swarm of two replicas of each of two spans (``LocalSwarm`` on 127.0.0.1, or with ``--hosts`` each
server on an emulated host of its own, ``shardnet/netns.py``, root only) and one client with default
settings (push on). Each scenario generates ``--new-tokens`` greedy tokens from a ``--prompt-len`` prompt
twice: once without a fault, once with the fault when token ``--fault-at`` arrives, against the route's
server for hop ``--hop``. One JSON line per scenario:

- ``freeze``: SIGSTOP (SIGCONT after the generation): the step runs past its budget and is hedged;
- ``handoff``: SIGTERM: the server drains and hands the session's KV cache to the other replica;
- ``replay``: SIGKILL: the client replays the session's history into the other replica;
- ``link_servers`` (``--hosts``): the hop's server loses its links to both holders of the next span
  (the client still reaches everyone): one push fails, the client delivers that step itself;
- ``link_client`` (``--hosts``): the client loses its link to the hop's server: the step is hedged.

``added_s`` is the faulty generation's time minus the fault-free one's; ``fault_step_s`` the time of the
step after the fault (the hand-off or the replay itself) and ``step_s`` the median of the other steps.
The server that took the fault is replaced before the next scenario.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import time

import harness
import psutil
import torch
from transformers import AutoModelForCausalLM

from shardnet import ShardedModel
from shardnet.client.trust import ServerTrust
from shardnet.launch import LocalSwarm, even_spans
from shardnet.netns import HostNetwork

logger = logging.getLogger("benchmarks.fault_latency")
SIGNALS = {"freeze": signal.SIGSTOP, "handoff": signal.SIGTERM, "replay": signal.SIGKILL}
LINKS = ("link_servers", "link_client")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(parser)
    parser.add_argument("--scenario", nargs="+", choices=[*SIGNALS, *LINKS], default=list(SIGNALS))
    parser.add_argument("--hosts", action="store_true", help="servers on emulated hosts (needed for link_*)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--fault-at", type=int, default=6, help="the fault comes when this token arrives")
    parser.add_argument(
        "--hop", type=int, default=0, choices=[0, 1], help="the route's hop whose server faults"
    )
    args = parser.parse_args()
    if not 1 <= args.fault_at < args.new_tokens:
        parser.error("--fault-at must be in 1 .. --new-tokens - 1")
    if set(args.scenario) & set(LINKS) and not args.hosts:
        parser.error("link_servers and link_client need --hosts")
    return args


class Stamps:
    """A streamer: calls ``action`` once after token ``at`` and stamps every token."""

    def __init__(self, at: int | None = None, action=None):
        self.at, self.action = at, action
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if len(self.times) == self.at:
            self.action()

    def end(self) -> None:
        pass


def server_of(swarm: LocalSwarm, record):
    for process in swarm.servers:
        if process.poll() is not None:
            continue
        host = swarm.host_of(process)
        if host is not None and host.address == record.host:
            return process
        if host is None and record.port in {
            c.laddr.port for c in psutil.Process(process.pid).net_connections("tcp") if c.status == "LISTEN"
        }:
            return process
    raise LookupError(f"no server of this swarm is {record.host}:{record.port}")


def host_at(network, address: str):
    return next(host for host in network.hosts if host.address == address)


def run_scenario(swarm, model, local_tokens, prompt, args, scenario) -> dict:
    health = ServerTrust.shared()
    began = time.perf_counter()
    clean = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
    clean_s = time.perf_counter() - began
    hit, cuts = [], []
    with model.inference_session(max_length=prompt.shape[1] + args.new_tokens + 8) as session:

        def fault() -> None:
            record = session.route[args.hop].server.record
            if scenario == "link_servers":
                after = session.route[args.hop + 1].start if args.hop + 1 < len(session.route) else None
                for view in model.planner.view.snapshot().servers:
                    if view.record.start == after:
                        cuts.append(
                            (host_at(swarm.network, record.host), host_at(swarm.network, view.record.host))
                        )
            elif scenario == "link_client":
                cuts.append((swarm.network.bridge, host_at(swarm.network, record.host)))
            else:
                process = server_of(swarm, record)
                process.send_signal(SIGNALS[scenario])
                hit.append((process, (record.start, record.end)))
            for a, b in cuts:
                swarm.network.cut(a, b)

        before = health.counts()
        stamps = Stamps(args.fault_at, fault)
        began = time.perf_counter()
        try:
            got = model.generate(
                prompt, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, streamer=stamps
            )
        finally:
            for process, _ in hit:
                if scenario == "freeze":
                    process.send_signal(signal.SIGCONT)
            for a, b in cuts:
                swarm.network.restore(a, b)
        faulty_s = time.perf_counter() - began
        counts = {key: value - before.get(key, 0) for key, value in health.counts().items()}
        handoffs, failovers = session.chain.handoffs, session.chain.failovers
    gaps = [b - a for a, b in zip(stamps.times, stamps.times[1:], strict=False)]
    fault_step = gaps[args.fault_at - 1]
    for process, span in hit:  # the next scenario starts from two replicas of each span again
        if scenario == "freeze":
            process.kill()
        process.wait(timeout=60)
        swarm.start_server(*span)
    swarm.wait_ready(timeout_s=180)
    return harness.record(
        "fault_latency",
        scenario=scenario,
        model=args.model,
        prompt_len=prompt.shape[1],
        new_tokens=args.new_tokens,
        hop=args.hop,
        exact=clean.tolist() == local_tokens and got.tolist() == local_tokens,
        clean_s=round(clean_s, 3),
        faulty_s=round(faulty_s, 3),
        added_s=round(faulty_s - clean_s, 3),
        fault_step_s=round(fault_step, 3),
        step_s=round(harness.median(gaps[: args.fault_at - 1] + gaps[args.fault_at :]), 4),
        handoffs=handoffs,
        failovers=failovers,
        hedges=counts.get("hedges", 0),
        replays=counts.get("replays", 0),
        broken_pushes=counts.get("broken_pushes", 0),
        delivered=counts.get("delivered", 0),
    )


def main() -> None:
    args = parse_args()
    harness.setup(args)
    model_path = harness.resolve_model(args.model)
    blocks = harness.num_blocks(model_path)
    spans = [span for span in even_spans(blocks, 2) for _ in range(2)]
    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=harness.torch_dtype(args.dtype)).eval()
    prompt = harness.random_prompt(local.config.vocab_size, 1, args.prompt_len)
    with torch.inference_mode():
        want = local.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
    network = HostNetwork() if args.hosts else contextlib.nullcontext()
    with harness.time_limit(args.time_limit_s), network:
        swarm = LocalSwarm(
            model_path,
            spans,
            dtype=args.dtype,
            log_dir=harness.swarm_log_dir(args.log_dir, "fault_latency"),
            torch_threads=args.server_threads,
            network=network if args.hosts else None,
        )
        with swarm:
            run_all(swarm, model_path, want.tolist(), prompt, args)


def run_all(
    swarm: LocalSwarm, model_path, want: list, prompt: torch.Tensor, args: argparse.Namespace
) -> None:
    dtype = harness.torch_dtype(args.dtype)
    with ShardedModel.from_pretrained(model_path, swarm.initial_peers, dtype=dtype) as model:
        for scenario in args.scenario:
            harness.emit(run_scenario(swarm, model, want, prompt, args, scenario))


if __name__ == "__main__":
    main()
