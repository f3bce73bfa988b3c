"""The nemesis of ``chaos.py``: a seeded schedule of faults against a ``LocalSwarm``, and what the run started.

Process faults (kill -9, SIGSTOP, SIGTERM, the DHT bootstrap node's death) are signals and work the
same everywhere; link faults go through the fault injector (``chaos_injectors.py``), which says which
kinds it supports. A kind it does not support takes no slot of the schedule: it is counted in ``skipped``.
"""

from __future__ import annotations

import heapq
import logging
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from shardnet.dht import ServerState, lookup
from shardnet.launch import LocalSwarm

logger = logging.getLogger("benchmarks.chaos")
FAULT_KINDS = ("kill9_restart", "freeze", "link_cut_servers", "link_cut_client", "dht_restart", "drain")
FREEZE_S = 4.0  # SIGSTOP to SIGCONT
LINK_CUT_S = (3.0, 8.0)  # a cut link stays cut for a uniform draw from this range
DHT_DOWN_S = (3.0, 6.0)  # the bootstrap node stays dead this long before it restarts (same maddr)
RESTART_AFTER_S = (1.0, 3.0)  # a killed server's replacement starts this long after the kill
EXTRA_PEERS = 3  # a replacement's initial peers: the bootstrap node and this many servers' DHT nodes


# ---- faults ----


@dataclass
class Fault:
    kind: str
    target: str  # e.g. "server 0:3#1234", "dht"
    start_s: float  # seconds since the run began
    end_s: float | None = None  # None while in flight
    detail: dict = field(default_factory=dict)

    def overlaps(self, start_s: float, end_s: float) -> bool:
        return self.start_s <= end_s and (self.end_s is None or self.end_s >= start_s)

    def as_dict(self) -> dict:
        end = None if self.end_s is None else round(self.end_s, 2)
        return {
            "kind": self.kind,
            "target": self.target,
            "start_s": round(self.start_s, 2),
            "end_s": end,
            **self.detail,
        }


class Nemesis:
    """Injects one fault every ``every_s`` seconds, cycling through the kinds in a seeded order; each
    fault's later actions (SIGCONT, restart, restore) wait in a queue run by the same loop."""

    def __init__(self, swarm: LocalSwarm, spans, injector, watcher, seed: int, every_s: float, clock):
        self.swarm, self.injector, self.watcher = swarm, injector, watcher
        self.every_s, self.clock = every_s, clock  # clock(): seconds since the run began
        self.rng = random.Random(seed)
        self.spans = {process.pid: span for process, span in zip(swarm.servers, spans, strict=True)}
        self.faults: list[Fault] = []
        self.skipped: Counter[str] = Counter()
        self.errors: list[str] = []  # faults or actions that failed (the run goes on)
        self.unexpected_exits = 0  # servers that exited with no kill or drain of ours
        self._exited: set[int] = set()  # servers seen dead
        self._stopped: set[int] = set()  # servers killed or drained on purpose
        self.ledger: dict[int, float] = {}  # pid -> create time of every process the run started
        self._queue: list[tuple[float, int, bool, Callable[[], None]]] = []  # (due, seq, essential, action)
        self._seq = 0
        self._busy: set[int] = set()  # servers under a fault now
        self._cycle: list[str] = []
        self._threads: list[threading.Thread] = []  # DHT node restarts

    # -- the loop --

    def run(self, seconds: float) -> None:
        end, next_fault = self.clock() + seconds, self.clock()
        while self.clock() < end:
            self._run_due(self.clock())
            self._check_exits()
            if self.clock() >= next_fault:
                self.note_processes()
                self._inject(self._next_kind())
                next_fault += self.every_s
            time.sleep(0.05)

    def heal(self) -> None:
        """Run every pending action that undoes a fault (SIGCONT, restore); drop restarts and watches."""
        while self._queue:
            _, _, essential, action = heapq.heappop(self._queue)
            if essential:
                self._guarded(action)
        for thread in self._threads:  # a DHT node started after LocalSwarm.stop() would outlive the run
            thread.join(timeout=90)
        for fault in self.faults:
            if fault.end_s is None:
                fault.end_s, fault.detail["cut_short"] = self.clock(), True

    def later(self, delay_s: float, action: Callable[[], None], essential: bool = False) -> None:
        heapq.heappush(self._queue, (self.clock() + delay_s, self._seq, essential, action))
        self._seq += 1

    def _run_due(self, now: float) -> None:
        while self._queue and self._queue[0][0] <= now:
            self._guarded(heapq.heappop(self._queue)[3])

    def _guarded(self, action: Callable[[], Fault | None]) -> Fault | None:
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 (reported in the JSON line; the schedule goes on)
            self.errors.append(f"{getattr(action, '__name__', '?')}: {type(exc).__name__}: {exc}"[:300])
            logger.exception("nemesis action %s failed", action)
            return None

    def _next_kind(self) -> str:
        while True:
            if not self._cycle:
                self._cycle = self.rng.sample(FAULT_KINDS, len(FAULT_KINDS))
            kind = self._cycle.pop()
            if self.injector.supports(kind):
                return kind
            self.skipped[kind] += 1

    def _inject(self, kind: str) -> None:
        fault = self._guarded(getattr(self, f"_{kind}"))
        if fault is not None:
            self.faults.append(fault)
            logger.info("fault %s on %s at %.1fs", kind, fault.target, fault.start_s)

    def _finish(self, fault: Fault, *release: int) -> None:
        fault.end_s = self.clock()
        self._busy.difference_update(release)
        logger.info("fault %s on %s over at %.1fs %s", fault.kind, fault.target, fault.end_s, fault.detail)

    # -- the kinds --

    def _kill9_restart(self) -> Fault | None:
        victim = self._victim()
        if victim is None:
            return None
        victim.kill()
        self._stopped.add(victim.pid)
        fault = self._fault("kill9_restart", victim)

        def restart() -> None:
            fault.detail["replacement"] = self._start_replacement(self.spans[victim.pid])
            self._finish(fault, victim.pid)

        self.later(self.rng.uniform(*RESTART_AFTER_S), restart)
        return fault

    def _freeze(self) -> Fault | None:
        victim = self._victim()
        if victim is None:
            return None
        victim.send_signal(signal.SIGSTOP)
        fault = self._fault("freeze", victim)

        def thaw() -> None:
            victim.send_signal(signal.SIGCONT)
            self._finish(fault, victim.pid)

        self.later(FREEZE_S, thaw, essential=True)
        return fault

    def _link_cut_servers(self) -> Fault | None:
        a, b = self._victim(), self._victim()
        if a is None or b is None:
            self._busy.discard(getattr(a, "pid", None))
            return None
        self.injector.cut_link(self.swarm, a, b)
        fault = Fault("link_cut_servers", f"{self._name(a)} <-> {self._name(b)}", self.clock())

        def restore() -> None:
            self.injector.restore_link(self.swarm, a, b)
            self._finish(fault, a.pid, b.pid)

        self.later(self.rng.uniform(*LINK_CUT_S), restore, essential=True)
        return fault

    def _link_cut_client(self) -> Fault | None:
        server = self._victim()
        if server is None:
            return None
        self.injector.cut_client(self.swarm, server)
        fault = Fault("link_cut_client", f"client <-> {self._name(server)}", self.clock())

        def restore() -> None:
            self.injector.restore_client(self.swarm, server)
            self._finish(fault, server.pid)

        self.later(self.rng.uniform(*LINK_CUT_S), restore, essential=True)
        return fault

    def _dht_restart(self) -> Fault | None:
        old = self.swarm.dht_process
        if old is None or old.poll() is not None:
            return None
        old.kill()
        fault = Fault("dht_restart", "dht", self.clock())

        def restart() -> None:  # in a thread: a new node takes seconds to join, the schedule goes on
            try:
                fault.detail["peer"] = self.swarm.restart_dht()  # same identity, port and host: same maddr
                self.ledger[self.swarm.dht_process.pid] = _create_time(self.swarm.dht_process.pid)
            except Exception as exc:  # noqa: BLE001 (reported: the swarm runs on without a bootstrap node)
                fault.detail["restart_error"] = f"{type(exc).__name__}: {exc}"
                logger.error("DHT node restart failed: %s", exc)
            self._finish(fault)

        def start() -> None:
            self._threads.append(threading.Thread(target=restart, name="chaos-dht-restart", daemon=True))
            self._threads[-1].start()

        self.later(self.rng.uniform(*DHT_DOWN_S), start)
        return fault

    def _drain(self) -> Fault | None:
        victim = self._victim()
        if victim is None:
            return None
        victim.send_signal(signal.SIGTERM)
        self._stopped.add(victim.pid)
        fault = self._fault("drain", victim)
        began = self.clock()

        def replace() -> None:
            fault.detail["replacement"] = self._start_replacement(self.spans[victim.pid])

        def exited() -> None:  # the fault lasts until the drained server is gone (at most 60 s watched)
            if victim.poll() is None and self.clock() - began < 60:
                self.later(0.5, exited)
                return
            fault.detail["exit_code"] = victim.poll()
            self._finish(fault, victim.pid)

        self.later(1.0, replace)
        self.later(0.5, exited)
        return fault

    # -- servers and coverage --

    def live_servers(self) -> list:
        return [p for p in self.swarm.servers if p.poll() is None and p.pid in self.spans]

    def coverage(self, without: set[int]) -> list[int]:
        counts = [0] * self.swarm.num_blocks
        for process in self.live_servers():
            if process.pid not in without:
                start, end = self.spans[process.pid]
                for block in range(start, end):
                    counts[block] += 1
        return counts

    def _victim(self):
        """A random server under no fault, preferably one whose loss leaves every block served."""
        free = [p for p in self.live_servers() if p.pid not in self._busy]
        safe = [p for p in free if min(self.coverage(self._busy | {p.pid})) >= 1]
        pool = safe or free
        if not pool:
            return None
        victim = self.rng.choice(pool)
        self._busy.add(victim.pid)
        return victim

    def _start_replacement(self, old_span: tuple[int, int]) -> str:
        """Half the time the old span again, else a span around the least served block, of the old
        length +-1 (so the swarm's boundaries drift: 0:3 may come back as 1:5)."""
        start, end = old_span
        if self.rng.random() < 0.5:
            counts = self.coverage(self._busy)
            low = min(counts)
            block = self.rng.choice([b for b, count in enumerate(counts) if count == low])
            length = min(self.rng.randint(max(1, end - start - 1), end - start + 1), len(counts))
            start = self.rng.randint(max(0, block - length + 1), min(block, len(counts) - length))
            end = start + length
        # Like a volunteer told several initial peers: with the bootstrap node alone, a server started while
        # it is down exits ("failed to connect to bootstrap peers") and the swarm shrinks for good.
        try:
            peers = [*self.swarm.initial_peers, *server_dht_maddrs(self.swarm, self.watcher)[:EXTRA_PEERS]]
        except Exception as exc:  # noqa: BLE001 (a look-up that timed out: the bootstrap node alone)
            logger.warning("no servers' DHT addresses for a replacement: %s", exc)
            peers = self.swarm.initial_peers
        process = self.swarm.start_server(start, end, ["--initial-peers", *peers])  # the last flag wins
        self.spans[process.pid] = (start, end)
        self.ledger[process.pid] = _create_time(process.pid)
        return self._name(process)

    def _check_exits(self) -> None:
        for process in self.swarm.servers:
            if process.pid in self._exited or process.poll() is None:
                continue
            self._exited.add(process.pid)
            if process.pid not in self._stopped and process.pid in self.spans:
                self.unexpected_exits += 1
                self.errors.append(
                    f"{self._name(process)} exited with {process.poll()} on its own (see its log)"
                )
                logger.error("%s exited with %s on its own", self._name(process), process.poll())

    def _fault(self, kind: str, victim) -> Fault:
        return Fault(kind, self._name(victim), self.clock())

    def _name(self, process) -> str:
        start, end = self.spans[process.pid]
        return f"server {start}:{end}#{process.pid}"

    def note_processes(self) -> None:
        """Remember every process now under the swarm's (and the watcher's) processes, so one that
        outlives its parent (reparented after a kill -9) is still found at the end."""
        roots = [*self.swarm.servers, self.swarm.dht_process]
        for pid in [p.pid for p in roots if p is not None and p.poll() is None] + [self.watcher.pid]:
            try:
                process = psutil.Process(pid)
                for member in [process, *process.children(recursive=True)]:
                    self.ledger.setdefault(member.pid, member.create_time())
            except psutil.Error:
                continue


def server_dht_maddrs(swarm: LocalSwarm, watcher) -> list[str]:
    """Multiaddrs of the DHT nodes of the servers announced ONLINE, as the watcher's p2p daemon knows them."""
    views = lookup(watcher, swarm.model_id, swarm.num_blocks)
    online = {
        v.record.peer_id for block in views for v in block if v.record.state == ServerState.ONLINE.value
    }
    known = watcher.run_coroutine(_known_peers)
    return [f"{addr}/p2p/{peer}" for peer, addrs in known if peer in online for addr in addrs]


async def _known_peers(dht, node) -> list[tuple[str, list[str]]]:
    """Run inside the watcher's DHT process: every peer its p2p daemon is connected to, with addresses."""
    return [(info.peer_id.to_base58(), [str(a) for a in info.addrs]) for info in await node.p2p.list_peers()]


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def survivors(ledger: dict[int, float], exclude: set[int], wait_s: float = 10.0) -> list[str]:
    """Processes of the ledger still alive (same pid and create time) after up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for pid, created in ledger.items():
            try:
                process = psutil.Process(pid)
                if (
                    pid not in exclude
                    and abs(process.create_time() - created) < 0.05
                    and process.status() != psutil.STATUS_ZOMBIE
                ):
                    alive.append(f"{pid} {' '.join(process.cmdline()[-6:])[:120]}")
            except psutil.Error:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)
