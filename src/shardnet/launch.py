"""LocalSwarm: a DHT node and several ``shardnet serve`` processes on 127.0.0.1, started and stopped together.

Used by tests, benchmarks, ``servers/local_swarm.py`` and the quickstart. Every process is a real
``python -m shardnet`` child; ``stop()`` sends SIGTERM, waits, and kills what is left. With a
``network`` (``shardnet/netns.py``), each process runs on an emulated host of its own instead, and
listens and announces on that host's address.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from shardnet import process_template
from shardnet.dht import ServerState, lookup, start_dht
from shardnet.errors import ShardnetError
from shardnet.models import derive_model_id, load_config
from shardnet.netns import Host, HostNetwork
from shardnet.process_template import ForkedProcess, TemplateProcess
from shardnet.swarm_key import SwarmKey

logger = logging.getLogger(__name__)
_TCP_LISTEN = "0A"  # the LISTEN state in /proc/net/tcp
PARENT_PID_ENV = "SHARDNET_PARENT_PID"  # set for every child; the CLI ties the child's life to this pid


class SwarmStartError(ShardnetError):
    """A local swarm process exited or did not become ready in time; the message carries its log tail."""


def even_spans(num_blocks: int, num_servers: int) -> list[tuple[int, int]]:
    """Split 0:num_blocks into num_servers contiguous, near-equal half-open spans."""
    if not 1 <= num_servers <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks over {num_servers} servers")
    bounds = [round(i * num_blocks / num_servers) for i in range(num_servers + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class LocalSwarm:
    def __init__(
        self,
        model_path: str | Path,
        spans: Sequence[tuple[int, int]],
        dtype: str = "float32",
        extra_args: Sequence[str] = (),
        log_dir: str | Path | None = None,
        torch_threads: int | None = None,
        server_args: Sequence[Sequence[str]] | None = None,
        swarm_key_file: str | Path | None = None,
        preloaded: bool = True,
        network: HostNetwork | None = None,
    ):
        """``extra_args`` go to every server; ``server_args``, one list per span, to that span's server only
        (e.g. its own ``--port`` and ``--announce-port``). ``swarm_key_file``: a private swarm, whose DHT
        node and servers all start with ``--swarm-key-file``. ``preloaded``: fork the processes from a
        template that imported shardnet once (``shardnet/process_template.py``; Linux), instead of
        starting each interpreter afresh (what a benchmark of a server's own memory wants). ``network``:
        run the DHT node and each server on a host of its own (the first one no running process of this
        swarm is on, made if none is free), listening and announcing on its address; the caller closes
        it after ``stop()``. This process, and the clients it makes, stay on the bridge host."""
        self.model_path = Path(model_path)
        self.spans = list(spans)
        self.dtype = dtype
        self.extra_args = list(extra_args)
        if server_args is not None and len(server_args) != len(self.spans):
            raise ValueError(f"server_args has {len(server_args)} lists for {len(self.spans)} spans")
        self.server_args = [list(args) for args in server_args] if server_args else [[] for _ in self.spans]
        self.log_dir = Path(log_dir) if log_dir else None
        self.torch_threads = torch_threads
        self.swarm_key_file = Path(swarm_key_file) if swarm_key_file else None
        self.swarm_key = SwarmKey.from_file(swarm_key_file) if swarm_key_file else None
        self.preloaded = preloaded and process_template.supported()
        config = load_config(self.model_path)
        self.model_id = derive_model_id(config)
        self.num_blocks = int(config.num_hidden_layers)
        self.initial_peers: list[str] = []
        self.dht_process: subprocess.Popen | ForkedProcess | None = None
        self.servers: list[subprocess.Popen | ForkedProcess] = []
        self._logs: list = []
        self._labels: dict[int, str] = {}  # server pid -> what it was asked to serve, e.g. "--blocks 0:3"
        self._announce_ports: dict[int, int] = {}  # server pid -> its --announce-port, where it has one
        self.network = network
        self._hosts: dict[int, Host] = {}  # pid -> the host it runs on, with a network
        self._announce_hosts: dict[int, str] = {}  # server pid -> the host it announces, with a network
        self._probe = None  # a client-mode DHT node of our own, for wait_ready
        self._identity_dir: tempfile.TemporaryDirectory | None = None  # the DHT node's key, for restarts

    def _spawn(
        self, args: list[str], name: str, stdout=None, host: Host | None = None
    ) -> subprocess.Popen | ForkedProcess:
        log_path = self.log_dir / f"{name}.log" if self.log_dir else None
        # PARENT_PID_ENV: the child asks the kernel for SIGTERM when we die, even by SIGKILL (see cli.py),
        # since its own session keeps it out of reach of our process group.
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{PARENT_PID_ENV: str(os.getpid())})
        if self.preloaded:  # forked from the template: its parent there, and a session of its own too
            process = TemplateProcess.shared().spawn(
                args, env, log_path, stdout_pipe=stdout is not None, netns=host.netns if host else None
            )
        else:
            process = self._popen(args, env, log_path, stdout, host)
        if host:
            self._hosts[process.pid] = host
        return process

    def _popen(self, args: list[str], env: dict, log_path: Path | None, stdout, host: Host | None):
        log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
        if log is not subprocess.DEVNULL:
            self._logs.append(log)
        # A session of its own: Ctrl-C at a terminal reaches only our process, which stops the children
        # in order (servers first, DHT last) instead of every process tearing itself down at once.
        return subprocess.Popen(
            [*(host.exec_prefix if host else []), sys.executable, "-m", "shardnet", *args],
            stdout=stdout or log,
            stderr=log,
            env=env,
            text=True,
            start_new_session=True,
        )

    def host_of(self, process: subprocess.Popen | ForkedProcess) -> Host | None:
        """The host ``process`` (the DHT node or a server) runs on; None without a network."""
        return self._hosts.get(process.pid)

    def _place(self, host: Host | None) -> Host | None:
        """``host``, or with a network the first host no running process of this swarm is on."""
        if self.network is None:
            if host is not None:
                raise ValueError("a host to run on needs LocalSwarm(..., network=HostNetwork(...))")
            return None
        if host is not None:
            return host
        running = [self.dht_process, *self.servers]
        taken = {self._hosts.get(p.pid) for p in running if p is not None and p.poll() is None}
        free = [h for h in self.network.hosts if h not in taken]
        return free[0] if free else self.network.add_host()

    def start_dht(self, timeout_s: float = 60.0, host: Host | None = None) -> list[str]:
        host = self._place(host)
        self._identity_dir = tempfile.TemporaryDirectory(prefix="shardnet-dht-")
        self.initial_peers = [self._run_dht(host, 0, timeout_s)]
        # Started now, while this process has no gRPC calls in flight: hivemind forks its node, and a fork
        # taken while gRPC threads are busy (e.g. in a test that adds servers mid-generation) can hang it.
        self._probe = start_dht(self.initial_peers, client_mode=True, swarm_key=self.swarm_key)
        return self.initial_peers

    def restart_dht(self, timeout_s: float = 60.0) -> str:
        """Start the DHT node again after it was killed: on the same host and port, with the same identity,
        so it comes back at the same multiaddr and every ``--initial-peers`` given out stays valid."""
        if self.dht_process is None or self.dht_process.poll() is None:
            raise SwarmStartError("restart_dht: the DHT node is not started, or still running")
        host = self.host_of(self.dht_process)
        maddr = self.initial_peers[0]
        port = int(maddr.split("/tcp/")[1].split("/")[0])
        # It rejoins through the servers' DHT nodes, as an operator restarting a bootstrap node passes
        # --initial-peers of some servers: else it knows only the nodes that happen to call it again.
        again = self._run_dht(host, port, timeout_s, self._known_maddrs())
        if again != maddr:
            raise SwarmStartError(f"the DHT node came back as {again}, not {maddr}")
        return again

    def _known_maddrs(self) -> list[str]:
        """Multiaddrs of the DHT nodes our probe is connected to (the servers' own nodes)."""
        if self._probe is None:
            return []
        known = self._probe.run_coroutine(_connected_peers)
        return [f"{address}/p2p/{peer}" for peer, addresses in known for address in addresses]

    def _run_dht(self, host: Host | None, port: int, timeout_s: float, peers: Sequence[str] = ()) -> str:
        """Start ``shardnet dht`` and return the multiaddr it prints first."""
        address = host.address if host else "127.0.0.1"
        identity = Path(self._identity_dir.name) / "dht.key"
        args = ["dht", "--host", address, "--port", str(port), "--identity", str(identity), *self._key_args()]
        if peers:
            args += ["--initial-peers", *peers]
        name = "dht" if port == 0 else f"dht.restart{int(time.time())}"
        self.dht_process = self._spawn(args, name, subprocess.PIPE, host)
        first = _read_line(self.dht_process, timeout_s)
        if not first.startswith("/"):
            raise SwarmStartError(f"shardnet dht printed {first!r} instead of a multiaddr")
        return first.strip()

    def _key_args(self) -> list[str]:
        return ["--swarm-key-file", str(self.swarm_key_file)] if self.swarm_key_file else []

    def start_server(
        self, start: int, end: int, extra_args: Sequence[str] = (), host: Host | None = None
    ) -> subprocess.Popen:
        """A server for blocks start:end (``--blocks``); with a network, on ``host`` or a free one."""
        return self._start_serve(["--blocks", f"{start}:{end}"], f"server_{start}_{end}", extra_args, host)

    def start_server_choosing(
        self, num_blocks: int, extra_args: Sequence[str] = (), host: Host | None = None
    ) -> subprocess.Popen:
        """A server that chooses where to serve its ``num_blocks`` blocks (``--num-blocks``)."""
        where = ["--num-blocks", str(num_blocks)]
        return self._start_serve(where, f"server_n{num_blocks}", extra_args, host)

    def _start_serve(
        self, where: list[str], name: str, extra_args: Sequence[str], host: Host | None
    ) -> subprocess.Popen:
        host = self._place(host)
        on_host = ["--host", host.address, "--dht-host", host.address] if host else []
        args = [
            "serve",
            "--model",
            str(self.model_path),
            *where,
            "--dtype",
            self.dtype,
            "--initial-peers",
            *self.initial_peers,
            *self._key_args(),
            *on_host,
            *self.extra_args,
            *extra_args,
        ]
        if self.torch_threads:
            args += ["--torch-threads", str(self.torch_threads)]
        copies = sum(1 for label in self._labels.values() if label == " ".join(where))
        name = name if not copies else f"{name}.{copies}"  # replicas: .1, .2, ...
        process = self._spawn(args, name, host=host)
        self.servers.append(process)
        self._labels[process.pid] = " ".join(where)
        announce_port = _last_value(args, "--announce-port")
        if announce_port is not None:  # the port wait_ready looks for in the DHT, not the one it listens on
            self._announce_ports[process.pid] = int(announce_port)
        if host is not None:  # the address wait_ready looks for: --announce-host, else --host
            self._announce_hosts[process.pid] = _last_value(args, "--announce-host") or host.address
        return process

    def start(self, timeout_s: float = 120.0) -> LocalSwarm:
        try:
            self.start_dht()
            for (start, end), args in zip(self.spans, self.server_args, strict=True):
                self.start_server(start, end, args)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def online_addresses(self) -> set[tuple[str, int]]:
        """(host, gRPC port) of the servers the DHT shows ONLINE (a killed server's record lingers until
        it expires)."""
        addresses = set()
        for views in lookup(self._probe, self.model_id, self.num_blocks):
            online = [v.record for v in views if v.record.state == ServerState.ONLINE.value]
            addresses |= {(record.host, record.port) for record in online}
        return addresses

    def online_ports(self) -> set[int]:
        """gRPC ports of the servers the DHT shows ONLINE."""
        return {port for _, port in self.online_addresses()}

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Poll the DHT until every running server is ONLINE (or one fails, or time runs out)."""
        deadline = time.monotonic() + timeout_s
        while True:
            running = []
            for process in self.servers:
                if process.poll() is None:
                    running.append(process)
                elif process.returncode not in (0, -signal.SIGKILL):  # drained, or killed by a test: fine
                    raise SwarmStartError(
                        f"server {self._labels.get(process.pid, '?')} exited with {process.returncode}"
                    )
            online = self.online_addresses()
            waiting = [process for process in running if not self._is_online(process, online)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                spans = [self._labels.get(process.pid, "?") for process in waiting]
                raise SwarmStartError(f"servers {spans} not online after {timeout_s}s")
            time.sleep(0.2)

    def _is_online(self, process, online: set[tuple[str, int]]) -> bool:
        announced = self._announce_ports.get(process.pid)
        ports = {announced} if announced else listening_ports(process.pid)
        address = self._announce_hosts.get(process.pid)
        if address is None:
            return bool(ports & {port for _, port in online})
        # A port number can repeat on another host: the address tells the servers apart.
        return any((address, port) in online for port in ports)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM servers, then the DHT (reverse order of start); kill whatever is still alive."""
        processes = [*reversed(self.servers), *([self.dht_process] if self.dht_process else [])]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._probe is not None:
            self._probe.shutdown()
            self._probe = None
        if self._identity_dir is not None:
            self._identity_dir.cleanup()
            self._identity_dir = None
        for log in self._logs:
            log.close()
        self.servers.clear()
        self._labels.clear()
        self._announce_ports.clear()
        self._hosts.clear()
        self._announce_hosts.clear()
        self.dht_process = None

    def __enter__(self) -> LocalSwarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _connected_peers(dht, node) -> list[tuple[str, list[str]]]:
    """Inside a DHT node's process: the peers its p2p daemon is connected to, with their addresses."""
    return [(info.peer_id.to_base58(), [str(a) for a in info.addrs]) for info in await node.p2p.list_peers()]


def _last_value(args: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` in ``args`` (argparse keeps the last), or None."""
    values = [value for name, value in zip(args[:-1], args[1:], strict=True) if name == flag]
    return values[-1] if values else None


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on, in its own network namespace (psutil reads the caller's)."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        ports = set()
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(FileNotFoundError):  # no IPv6
                for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                    fields = line.split()  # sl local_address rem_address st ... inode
                    if fields[3] == _TCP_LISTEN and fields[9] in inodes:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports
    except OSError:  # the process is gone
        return set()


def _read_line(process: subprocess.Popen, timeout_s: float) -> str:
    """First stdout line of a child, without blocking past timeout_s."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout_s):
        process.kill()
        raise SwarmStartError(f"{_command(process)} printed nothing in {timeout_s}s")
    line = process.stdout.readline()
    if not line:
        raise SwarmStartError(f"{_command(process)} exited with {process.wait()} before printing a line")
    return line


def _command(process: subprocess.Popen | ForkedProcess) -> list[str]:
    """The shardnet command and first argument of a child, e.g. ``['dht', '--host']``."""
    args = list(process.args)
    start = args.index("shardnet") + 1 if "shardnet" in args else 0
    return args[start : start + 2]
