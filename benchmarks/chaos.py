"""Chaos: clients generate without pause while a nemesis breaks the swarm; every output is checked.

    python benchmarks/chaos.py --loopback --minutes 5 --seed 1
    python benchmarks/chaos.py --minutes 10 --seed 2 --hosts 8 --log-dir chaos-logs   # network namespaces

A swarm of ``--hosts`` servers, two per span (``tiny``: 3 spans of its 8 blocks, 6 servers), and
``--clients`` threads of this process sharing one ``ShardedModel``: batch 1 and 2 (left padding),
greedy and seeded top-k sampling, prompts of 4-30 tokens, 8-40 new tokens, drawn from ``--specs``
generations whose local transformers output (float32) is computed first. After ``--warmup-s`` without
faults, the nemesis (``chaos_faults.py``, seeded by ``--seed``) injects one fault every ``--fault-every-s``
seconds for ``--minutes``, cycling in a seeded order through: ``kill9_restart`` (a replacement, on the
same span or one that drifted, starts 1-3 s later), ``freeze`` (SIGSTOP for 4 s), ``link_cut_servers``
and ``link_cut_client`` (3-8 s; namespace mode only, else counted in ``faults_skipped``), ``dht_restart``
(the bootstrap node killed, a new one after 3-6 s that joins the servers' DHT nodes) and ``drain``
(SIGTERM, a replacement 1 s later). A server under a fault is not picked for another; a victim whose
loss leaves a block unserved is picked only when no other is free.

Seeded sampling (``chaos_checks.SeededSampler``) is exact and thread-safe. Each mismatch is logged with the
first differing position, the local model's top-1 minus top-2 logit there (near 0: a near-tie, not a wrong
replay) and the faults in flight during that generation. One JSON line at the end; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import harness
import psutil
import torch
from chaos_checks import Spec, Stamps, explain, make_specs
from chaos_faults import FAULT_KINDS, Nemesis, survivors
from chaos_injectors import LoopbackFaults, NamespaceFaults
from transformers import AutoModelForCausalLM

from shardnet import ShardedModel
from shardnet.client.trust import ServerTrust
from shardnet.dht import start_dht
from shardnet.launch import LocalSwarm, even_spans

logger = logging.getLogger("benchmarks.chaos")
CLIENT_EVENTS = ("failovers", "hedges", "handoffs", "replays", "broken_pushes")
KEPT = 10  # exceptions (and nemesis errors) kept in the JSON line
MISMATCHES_KEPT = 200  # every mismatch, up to this many


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(parser)
    parser.set_defaults(server_threads=1, client_threads=1, time_limit_s=None)
    parser.add_argument("--minutes", type=float, default=5.0, help="chaos time, after the warm-up")
    parser.add_argument("--seed", type=int, default=0, help="seeds the generations and the fault schedule")
    parser.add_argument("--loopback", action="store_true", help="all on 127.0.0.1 (no link cuts)")
    parser.add_argument("--hosts", type=int, default=6, help="servers at start, two per span (even, >= 4)")
    parser.add_argument("--fault-every-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=30.0, help="fault-free run first (the baseline)")
    parser.add_argument("--clients", type=int, default=4, help="generating threads on one ShardedModel")
    parser.add_argument("--specs", type=int, default=48, help="distinct generations, checked locally first")
    args = parser.parse_args()
    if args.hosts < 4 or args.hosts % 2:
        parser.error("--hosts must be even and >= 4 (two servers per span)")
    if args.plot:
        parser.error("chaos.py draws no figure")
    if min(args.minutes, args.fault_every_s, args.clients, args.specs) <= 0 or args.warmup_s < 0:
        parser.error("--minutes, --fault-every-s, --clients, --specs must be > 0; --warmup-s >= 0")
    if args.time_limit_s is None:  # the run's own length, and 15 minutes for start-up and stopping
        args.time_limit_s = args.minutes * 60 + args.warmup_s + 900
    return args


@dataclass
class Outcome:
    client: int
    spec: Spec
    started_s: float
    ended_s: float
    gaps_s: list[float]
    exact: bool
    error: str | None = None
    mismatch: dict | None = None


class Clients:
    """Threads generating on one ShardedModel until ``stop`` is set; every output is checked at once."""

    def __init__(self, model, local, specs: list[Spec], args, clock, faults_between):
        self.model, self.local, self.specs, self.seed = model, local, specs, args.seed
        self.clock, self.faults_between = clock, faults_between
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"chaos-client-{i}", daemon=True)
            for i in range(args.clients)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout_s: float) -> int:
        """Wait for the threads' last generations; the number still running after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(deadline - time.monotonic(), 0.1))
        return sum(thread.is_alive() for thread in self.threads)

    def _loop(self, client: int) -> None:
        torch.set_grad_enabled(False)  # per thread
        rng = random.Random(self.seed * 7919 + client)
        while not self.stop.is_set():
            spec, stamps = rng.choice(self.specs), Stamps(self.clock)
            outcome = Outcome(client, spec, self.clock(), 0.0, [], False)
            try:
                got = self.model.generate(**spec.kwargs(), streamer=stamps)
                outcome.exact = got.shape == spec.reference.shape and torch.equal(got, spec.reference)
                if not outcome.exact:
                    outcome.mismatch = explain(spec, got, self.local)
            except Exception as exc:  # noqa: BLE001 (counted and reported: what the benchmark is for)
                outcome.error = f"{type(exc).__name__}: {exc}"[:400]
            outcome.ended_s, outcome.gaps_s = self.clock(), stamps.gaps_s()
            self.outcomes.append(outcome)
            if outcome.error or outcome.mismatch:
                faults = [f.as_dict() for f in self.faults_between(outcome.started_s, outcome.ended_s)]
                logger.warning(
                    "client %d %s %s: %s; faults in flight: %s",
                    client,
                    "raised" if outcome.error else "MISMATCH",
                    spec.settings(),
                    outcome.error or outcome.mismatch,
                    faults,
                )


def phase(outcomes: list[Outcome]) -> dict:
    gaps = [gap for o in outcomes for gap in o.gaps_s] or [0.0]
    latency = {
        "p50": harness.ms(harness.percentile(gaps, 50)),
        "p95": harness.ms(harness.percentile(gaps, 95)),
        "max": harness.ms(max(gaps)),
    }
    return {
        "generations": len(outcomes),
        "exact": sum(o.exact for o in outcomes),
        "mismatched": sum(o.mismatch is not None for o in outcomes),
        "raised": sum(o.error is not None for o in outcomes),
        "tokens": sum(len(o.gaps_s) for o in outcomes),
        "token_latency_ms": latency if outcomes else None,
    }


def failure(phase_name: str, outcome: Outcome, faults: list) -> dict:
    """A mismatch or an exception with its generation's settings and the faults in flight during it."""
    during = [f.as_dict() for f in faults if f.overlaps(outcome.started_s, outcome.ended_s)]
    found = {"mismatch": outcome.mismatch} if outcome.mismatch else {"error": outcome.error}
    return {
        "phase": phase_name,
        "client": outcome.client,
        **outcome.spec.settings(),
        "started_s": round(outcome.started_s, 2),
        "ended_s": round(outcome.ended_s, 2),
        **found,
        "faults_in_flight": during,
    }


def server_memory(processes) -> dict:
    """PSS of each server's process tree (the server, its DHT process and p2pd), in MiB."""
    per_server = {}
    for process in processes:
        try:
            per_server[process.pid] = harness.tree_pss_bytes(process.pid)[0]
        except psutil.Error:  # exited meanwhile
            continue
    total = sum(per_server.values())
    return {
        "servers": len(per_server),
        "pss_mib_total": harness.mib(total),
        "pss_mib_per_server": harness.mib(total / max(len(per_server), 1)),
        "pids": per_server,
    }


def memory_fields(memory: dict) -> dict:
    """Before and after the chaos, and for the servers alive at both times (the same processes)."""
    if "before" not in memory or "after" not in memory:
        return {}
    before, after = memory["before"].pop("pids"), memory["after"].pop("pids")
    both = before.keys() & after.keys()
    per = lambda pss: harness.mib(sum(pss[pid] for pid in both) / len(both))  # noqa: E731
    survived = (
        {
            "servers": len(both),
            "pss_mib_per_server_before": per(before),
            "pss_mib_per_server_after": per(after),
        }
        if both
        else {"servers": 0}
    )
    return {**memory, "survivors": survived}


def main() -> None:  # noqa: PLR0915 (one run, top to bottom)
    args = parse_args()
    harness.setup(args)
    model_path = harness.resolve_model(args.model)
    blocks = harness.num_blocks(model_path)
    spans = [span for span in even_spans(blocks, args.hosts // 2) for _ in range(2)]  # two replicas each
    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=harness.torch_dtype(args.dtype)).eval()
    specs = make_specs(args.seed, args.specs, local.config.vocab_size)
    with torch.no_grad():
        for spec in specs:
            spec.reference = local.generate(**spec.kwargs())
    logger.info("%d local references computed", len(specs))
    # The one switch between modes (chaos_injectors.py); a namespace network: a host per server and the DHT.
    injector = LoopbackFaults() if args.loopback else NamespaceFaults(args.hosts + 1)
    began = time.monotonic()
    clock = lambda: time.monotonic() - began  # noqa: E731
    swarm = watcher = model = nemesis = clients = None
    phases, memory, events, stuck = {}, {}, {}, 0
    try:
        with harness.time_limit(args.time_limit_s):
            swarm = LocalSwarm(
                model_path,
                spans,
                dtype=args.dtype,
                torch_threads=args.server_threads,
                log_dir=harness.swarm_log_dir(args.log_dir, "chaos"),
                **injector.swarm_options(),
            )
            swarm.start(timeout_s=300)
            # Our own client-mode DHT node, made before any gRPC channel exists here (hivemind forks): the
            # model looks up through it, and a restarted bootstrap node learns the servers' addresses from it.
            watcher = start_dht(
                swarm.initial_peers, client_mode=True, model_id=swarm.model_id, num_blocks=blocks
            )
            model = ShardedModel.from_pretrained(
                model_path, swarm.initial_peers, dht=watcher, dtype=harness.torch_dtype(args.dtype)
            )
            nemesis = Nemesis(swarm, spans, injector, watcher, args.seed, args.fault_every_s, clock)
            nemesis.note_processes()
            faults_between = lambda a, b: [f for f in list(nemesis.faults) if f.overlaps(a, b)]  # noqa: E731
            clients = Clients(model, local, specs, args, clock, faults_between)
            clients.start()
            logger.info("warm-up: %.0fs without faults", args.warmup_s)
            time.sleep(args.warmup_s)
            chaos_s, events_before = clock(), ServerTrust.shared().counts()
            memory["before"] = server_memory(nemesis.live_servers())
            logger.info("chaos: %.1f min, one fault every %.1fs", args.minutes, args.fault_every_s)
            nemesis.run(args.minutes * 60)
            memory["after"] = server_memory(nemesis.live_servers())
            clients.stop.set()
            nemesis.heal()
            stuck = clients.join(timeout_s=150)
            events_after = ServerTrust.shared().counts()
            events = {
                k: events_after.get(k, 0) - events_before.get(k, 0) for k in {*CLIENT_EVENTS, *events_after}
            }
            phases = {
                "warmup": [o for o in clients.outcomes if o.started_s < chaos_s],
                "chaos": [o for o in clients.outcomes if o.started_s >= chaos_s],
            }
    finally:
        if clients is not None:
            clients.stop.set()
        if nemesis is not None:
            nemesis.heal()  # SIGCONT a frozen server before LocalSwarm.stop sends SIGTERM
            nemesis.note_processes()
        for closing in (
            model.close if model else None,
            watcher.shutdown if watcher else None,
            swarm.stop if swarm else None,
            injector.close,
        ):
            if closing is not None:
                try:
                    closing()
                except Exception as exc:  # noqa: BLE001 (go on stopping the rest)
                    logger.error("cleanup %s failed: %s", closing, exc)
    # This process's template (process_template.py) lives as long as it does: not a leftover.
    template = {p.pid for p in psutil.Process().children() if "process_template" in " ".join(p.cmdline())}
    left = survivors(nemesis.ledger if nemesis else {}, exclude=template)
    left += [
        f"{p.pid} {p.name()}"
        for p in psutil.Process().children(recursive=True)
        if p.pid not in template and p.status() != psutil.STATUS_ZOMBIE and f"{p.pid} " not in " ".join(left)
    ]
    failed = [(name, o) for name, outcomes in phases.items() for o in outcomes if o.error or o.mismatch]
    raised = Counter(o.error.split(":")[0] for _, o in failed if o.error)
    harness.emit(
        harness.record(
            "chaos",
            model=args.model,
            dtype=args.dtype,
            mode=injector.name,
            seed=args.seed,
            servers=args.hosts,
            spans=harness.span_names(spans),
            clients=args.clients,
            minutes=args.minutes,
            warmup_s=args.warmup_s,
            fault_every_s=args.fault_every_s,
            **phase(phases.get("chaos", [])),
            warmup=phase(phases.get("warmup", [])),
            clients_stuck=stuck,
            faults={kind: sum(f.kind == kind for f in nemesis.faults) for kind in FAULT_KINDS},
            faults_skipped=dict(nemesis.skipped),
            nemesis_errors=nemesis.errors[:KEPT],
            unexpected_exits=nemesis.unexpected_exits,
            client_events=events,
            mismatches=[failure(name, o, nemesis.faults) for name, o in failed if o.mismatch][
                :MISMATCHES_KEPT
            ],
            raised_by_type=dict(raised),
            raised_examples=[failure(name, o, nemesis.faults) for name, o in failed if o.error][:KEPT],
            fault_log=[f.as_dict() for f in nemesis.faults],
            server_memory=memory_fields(memory),
            processes_left=len(left),
            processes_left_detail=left[:KEPT],
            server_torch_threads=harness.threads_label(args.server_threads),
        )
    )


if __name__ == "__main__":
    main()
