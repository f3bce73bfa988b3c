"""HostNetwork: emulated separate hosts on one Linux machine, each a network namespace on one bridge.

A test (or ``LocalSwarm(..., network=...)``) puts the DHT, each server and each client on a host of its
own, so every connection crosses a real interface and a link between two hosts can be broken while
both keep running. Needs root and iproute2 (``ip``); ``available()`` says why not otherwise.

Layout, for a free subnet 10.213.K.0/24 (the first K none of whose addresses or routes exists here):

* the bridge ``sn<pid>x<n>b`` in the root namespace, address 10.213.K.1: the *bridge host*, where the
  process that made the network (a test acting as a client) lives;
* per host, namespace ``sn<pid>x<n>h<i>`` with ``lo`` up and ``eth0`` at 10.213.K.(i+2)/24, the other
  end of a veth pair ``sn<pid>x<n>v<i>`` plugged into the bridge. No default route: a host reaches
  the subnet only.

``cut(a, b)`` adds a route for b's /32 in a's namespace (and a's in b's), tagged ``proto 213``:

* ``unreachable`` (default), ``blackhole``, ``prohibit``: the sender's kernel refuses at once. A new
  ``connect()`` fails immediately (EHOSTUNREACH "No route to host", EINVAL, EACCES); an *established*
  TCP connection does not notice: its writes are buffered, nothing arrives, and it hangs until the
  application's own deadline or TCP's retransmission limit (~15 min), as across a real broken link.
  A gRPC channel stays READY and every call on it runs to its deadline (DEADLINE_EXCEEDED, never a
  fast UNAVAILABLE). After ``restore`` the connection resumes by itself: at once on the next write
  (what the kernel could not send is still queued), else on TCP's next retry (seconds).
* ``drop``: the packets leave and vanish: routed via a sink host (10.213.K.254, a namespace with
  forwarding off) that drops them silently. A new ``connect()`` then times out as across a WAN cut.

Note for gRPC clients: channels to one address share one connection (grpc's global subchannel pool),
so a channel made during a cut rides the hung connection too unless made with
``("grpc.use_local_subchannel_pool", 1)``.

Only addresses of its own subnet are ever targeted. ``close()`` (or leaving the ``with`` block) kills
every process still inside its namespaces, deletes its routes, namespaces, veths and bridge. Names carry
the creating pid: a new network first removes what networks of dead processes left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shardnet.iproute import (
    NETNS_DIR,
    SUBNET,
    NetworkSetupError,
    global_lock,
    ip,
    kill_all,
    links,
    namespaces,
    pids_in,
    subnet_of,
    subnets_in_use,
    try_ip,
)

ROUTE_PROTO = "213"  # marks the routes a cut adds, so leftovers of a dead network can be told apart
CUT_ROUTES = ("unreachable", "blackhole", "prohibit", "drop")
_IFNAMSIZ = 15  # longest interface name Linux accepts
_CLONE_NEWNET = 0x40000000
_SINK_OCTET = 254
_NAME = re.compile(r"^sn(\d+)x(\d+)(b|s|vs|v\d+|h\d+)$")  # every name a network makes
_local_lock = threading.Lock()  # names and subnets taken by this process's networks, while creating one


@dataclass(frozen=True)
class Host:
    """One emulated host: a network namespace (``netns``), or the bridge host (the root namespace)."""

    name: str  # the namespace's name, or "bridge"
    address: str  # its IPv4 address on the bridge's subnet
    netns: str | None  # namespace name; None for the bridge host

    @property
    def exec_prefix(self) -> list[str]:
        """What runs a command on this host: ``ip netns exec NAME`` (nothing on the bridge host)."""
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def __str__(self) -> str:
        return f"{self.name}({self.address})"


def available() -> str | None:
    """None when this process can make a host network, else why not (for ``pytest.skip``)."""
    return _probe()


@functools.cache
def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    with _local_lock:
        return _try_making(f"sn{os.getpid()}x{_next_sequence()}")


def _try_making(tag: str) -> str | None:
    netns, veth, bridge = f"{tag}h0", f"{tag}v0", f"{tag}b"
    try:
        ip("netns", "add", netns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("link", "add", bridge, "type", "bridge")
    except NetworkSetupError as exc:
        return f"cannot make network namespaces: {exc}"
    finally:
        for args in (("link", "del", bridge), ("link", "del", veth), ("netns", "del", netns)):
            with contextlib.suppress(NetworkSetupError):
                ip(*args)
    return None


def enter(netns: str) -> None:
    """Move the calling thread into namespace ``netns`` (``setns``; Python 3.11 has no ``os.setns``).

    Call it in a freshly forked, single-threaded child before it opens any socket: every thread and
    process it starts afterwards (hivemind's DHT process, p2pd) is on that host too."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
    finally:
        os.close(fd)


class HostNetwork:
    """A bridge and ``hosts`` namespaces joined to it (more with ``add_host``); see the module docstring."""

    def __init__(self, hosts: int = 0):
        self.hosts: list[Host] = []
        self._cuts: dict[tuple[Host, Host], str] = {}  # (sender, receiver) -> route type
        self._sink: Host | None = None
        self._closed = False
        self._made: list[tuple[str, str]] = []  # ("netns" | "link", name), in order of creation
        with global_lock(), _local_lock:
            remove_leftovers()
            self.tag = f"sn{os.getpid()}x{_next_sequence()}"
            self.subnet = _free_subnet()
            self.bridge = Host("bridge", f"{SUBNET}.{self.subnet}.1", None)
            self._bridge_link = self._name("b")
            try:
                ip("link", "add", self._bridge_link, "type", "bridge")
                self._made.append(("link", self._bridge_link))
                ip("addr", "add", f"{self.bridge.address}/24", "dev", self._bridge_link)
                ip("link", "set", self._bridge_link, "up")
            except BaseException:
                self.close()
                raise
        try:
            for _ in range(hosts):
                self.add_host()
        except BaseException:
            self.close()
            raise

    def _name(self, suffix: str) -> str:
        name = self.tag + suffix
        if len(name) > _IFNAMSIZ:
            raise NetworkSetupError(f"interface name {name} is longer than {_IFNAMSIZ} characters")
        return name

    def add_host(self) -> Host:
        """A new namespace on the bridge, with the next free address."""
        index = len(self.hosts)
        if index + 2 >= _SINK_OCTET:
            raise NetworkSetupError(f"a host network holds at most {_SINK_OCTET - 2} hosts")
        host = self._make_host(f"h{index}", f"v{index}", f"{SUBNET}.{self.subnet}.{index + 2}")
        self.hosts.append(host)
        return host

    def _make_host(self, netns_suffix: str, veth_suffix: str, address: str) -> Host:
        if self._closed:
            raise NetworkSetupError("this host network is closed")
        netns, veth = self.tag + netns_suffix, self._name(veth_suffix)
        ip("netns", "add", netns)
        self._made.append(("netns", netns))
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self._made.append(("link", veth))
        ip("link", "set", veth, "master", self._bridge_link, "up")
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        return Host(netns, address, netns)

    # ---- running things on a host ------------------------------------------------------------------

    def popen(self, host: Host, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """``subprocess.Popen(argv, **kwargs)`` on ``host`` (its pid is the command's own)."""
        return subprocess.Popen([*host.exec_prefix, *argv], **kwargs)

    def run(self, host: Host, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run(argv, **kwargs)`` on ``host``."""
        return subprocess.run([*host.exec_prefix, *argv], **kwargs)

    def pids(self, host: Host) -> list[int]:
        """Processes running on ``host`` (a namespace; the bridge host is everything else)."""
        if host.netns is None:
            raise ValueError("the bridge host is the root namespace: every other process runs there")
        return pids_in(host.netns)

    # ---- breaking links ----------------------------------------------------------------------------

    def cut(self, a: Host, b: Host, one_way: bool = False, route: str = "unreachable") -> None:
        """Break the link between ``a`` and ``b`` (with ``one_way``, only a -> b: a cannot send to b,
        so no TCP connection between them works either way, but b's packets still reach a).
        ``route``: one of ``CUT_ROUTES`` (module docstring)."""
        if route not in CUT_ROUTES:
            raise ValueError(f"route must be one of {CUT_ROUTES}, not {route!r}")
        if a == b:
            raise ValueError(f"cannot cut {a} from itself")
        self._check(a)
        self._check(b)
        for sender, receiver in [(a, b)] if one_way else [(a, b), (b, a)]:
            target = f"{receiver.address}/32"
            spec = [target, "via", self._sink_host().address] if route == "drop" else [route, target]
            ip(*_in(sender), "route", "replace", *spec, "proto", ROUTE_PROTO)
            self._cuts[(sender, receiver)] = route

    def restore(self, a: Host, b: Host) -> None:
        """Mend the link between ``a`` and ``b`` in both directions (whatever was cut)."""
        for sender, receiver in [(a, b), (b, a)]:
            if self._cuts.pop((sender, receiver), None) is not None:
                ip(*_in(sender), "route", "del", f"{receiver.address}/32", "proto", ROUTE_PROTO)

    def isolate(self, a: Host, route: str = "unreachable") -> None:
        """Cut ``a`` from every other host, the bridge host included."""
        for other in [self.bridge, *self.hosts]:
            if other != a:
                self.cut(a, other, route=route)

    def heal(self) -> None:
        """Restore every link this network has cut."""
        for sender, receiver in list(self._cuts):
            self.restore(sender, receiver)

    def _check(self, host: Host) -> None:
        if host != self.bridge and host not in self.hosts:
            raise ValueError(f"{host} is not a host of this network")

    def _sink_host(self) -> Host:
        """The host ``drop`` routes lead to; made on first use. It does not forward, so it drops what
        it is sent (without an ICMP answer: that goes only with forwarding on)."""
        if self._sink is None:
            self._sink = self._make_host("s", "vs", f"{SUBNET}.{self.subnet}.{_SINK_OCTET}")
            self.run(self._sink, ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"], check=True)
        return self._sink

    # ---- teardown ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process on its hosts, then delete its routes, namespaces, veths and bridge."""
        if self._closed:
            return
        self._closed = True
        errors = []
        try:
            kill_all([name for kind, name in self._made if kind == "netns"])
        except NetworkSetupError as exc:  # still delete what can be deleted
            errors.append(str(exc))
        for sender, receiver in list(self._cuts):
            if sender.netns is None:  # routes in the root namespace outlive the bridge
                errors += try_ip("route", "del", f"{receiver.address}/32", "proto", ROUTE_PROTO)
        self._cuts.clear()
        for kind, name in reversed(self._made):  # veths (both ends at once) before their namespaces
            errors += try_ip(kind, "del", name)
        self._made.clear()
        if errors:
            raise NetworkSetupError("; ".join(errors))

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HostNetwork({self.tag}, {SUBNET}.{self.subnet}.0/24, {len(self.hosts)} hosts)"


# ---- leftovers of dead processes -----------------------------------------------------------------------


def remove_leftovers() -> list[str]:
    """Delete the namespaces, links and cut routes of host networks whose creating process is dead
    (killed before ``close``); the names removed."""
    removed = []
    dead_namespaces = [name for name in namespaces() if _owner_dead(name)]
    kill_all(dead_namespaces)
    for name in links():
        if _owner_dead(name):
            removed += [name] if not try_ip("link", "del", name) else []
    for name in dead_namespaces:
        removed += [name] if not try_ip("netns", "del", name) else []
    live = subnets_in_use(routes=False)
    for line in ip("-4", "-o", "route", "show", "proto", ROUTE_PROTO).splitlines():
        target = line.split()[1] if line.split()[0] in CUT_ROUTES else line.split()[0]
        if subnet_of(target) is not None and subnet_of(target) not in live:
            removed += [target] if not try_ip("route", "del", target, "proto", ROUTE_PROTO) else []
    return removed


def _owner_dead(name: str) -> bool:
    match = _NAME.match(name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


# ---- names and subnets of this process's networks -------------------------------------------------


def _next_sequence() -> int:
    """The lowest network number no namespace or link of this process uses (names stay short)."""
    prefix = f"sn{os.getpid()}x"
    used = {int(_NAME.match(n).group(2)) for n in [*namespaces(), *links()] if n.startswith(prefix)}
    return next(n for n in itertools.count() if n not in used)


def _free_subnet() -> int:
    used = subnets_in_use(routes=True)
    for subnet in range(256):
        if subnet not in used:
            return subnet
    raise NetworkSetupError(f"every subnet {SUBNET}.K.0/24 is in use on this machine")


def _in(host: Host) -> list[str]:
    return ["-n", host.netns] if host.netns else []
