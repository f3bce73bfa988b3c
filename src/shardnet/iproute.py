"""What host networks (``shardnet.netns``) ask of the machine: ``ip`` commands, the namespaces, links and
10.213.K subnets that exist now, the processes inside a namespace, and the lock that keeps two processes
from choosing the same subnet. Linux, iproute2 and /proc; no state of its own."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from shardnet.errors import ShardnetError

NETNS_DIR = Path("/var/run/netns")
SUBNET = "10.213"  # hosts live in 10.213.K.0/24, one K per network
_KILL_TIMEOUT_S = 10.0
_LOCK = Path("/run/shardnet-netns.lock")


class NetworkSetupError(ShardnetError):
    """An ``ip`` command of the host network failed; the message carries the command and its stderr."""


def ip(*args: str) -> str:
    """Run ``ip ARGS``; its output, or ``NetworkSetupError`` with the command and its stderr."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise NetworkSetupError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def try_ip(*args: str) -> list[str]:
    """Run ``ip ARGS``; its error as a one-item list (an empty list if it worked)."""
    try:
        ip(*args)
    except NetworkSetupError as exc:
        return [str(exc)]
    return []


def namespaces() -> list[str]:
    """Every named network namespace on the machine (``ip netns`` names), sorted."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def links() -> list[str]:
    """Every link in the root namespace, by name (a veth without its ``@peer``)."""
    names = []
    for line in ip("-o", "link", "show").splitlines():
        names.append(line.split(":", 2)[1].strip().split("@", 1)[0])
    return names


def subnets_in_use(routes: bool) -> set[int]:
    """The K of every 10.213.K.x address (and, with ``routes``, route) in the root namespace."""
    text = ip("-4", "-o", "addr", "show")
    if routes:
        text += ip("-4", "-o", "route", "show", "table", "all")
    pattern = re.compile(rf"\b{re.escape(SUBNET)}\.(\d+)\.\d+")
    return {int(k) for k in pattern.findall(text)}


def subnet_of(address: str) -> int | None:
    match = re.match(rf"^{re.escape(SUBNET)}\.(\d+)\.\d+(/32)?$", address)
    return int(match.group(1)) if match else None


def pids_in(netns: str) -> list[int]:
    try:
        target = os.stat(NETNS_DIR / netns)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # gone, or a zombie (it left its namespaces when it exited)
            continue
        if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return pids


def kill_all(namespaces: Sequence[str]) -> None:
    """SIGKILL every process in ``namespaces`` until none is left (children forked meanwhile too)."""
    deadline = time.monotonic() + _KILL_TIMEOUT_S
    while True:
        pids = [pid for netns in namespaces for pid in pids_in(netns)]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise NetworkSetupError(f"processes {pids} outlived SIGKILL in {list(namespaces)}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@contextlib.contextmanager
def global_lock() -> Iterator[None]:
    """Held while choosing a subnet and making the bridge, so networks of two processes never share one."""
    with open(_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
