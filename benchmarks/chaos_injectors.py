"""The fault injector seam of ``chaos.py``: where the swarm's processes run and how a link between two of
them breaks. Everything else the nemesis does (signals, restarts) is the same in every mode.

An injector gives ``LocalSwarm`` its extra keyword arguments (``swarm_options``), says which fault kinds
it can inject (``supports``), cuts and restores links, and is closed after the swarm stops. ``a``, ``b``
and ``server`` are server processes of the swarm (``LocalSwarm.servers``); the client is this process.
"""

from __future__ import annotations

from shardnet.launch import LocalSwarm

NAMESPACE_ONLY = frozenset({"link_cut_servers", "link_cut_client"})


class LoopbackFaults:
    """Every process on 127.0.0.1: no links to cut. A namespace injector overrides the link methods."""

    name = "loopback"

    def swarm_options(self) -> dict:
        """Extra ``LocalSwarm`` keyword arguments (a namespace injector passes its ``network``)."""
        return {}

    def supports(self, kind: str) -> bool:
        return kind not in NAMESPACE_ONLY

    def cut_link(self, swarm: LocalSwarm, a, b) -> None:  # a, b: server processes
        raise NotImplementedError("loopback: no link between two servers can be cut")

    def restore_link(self, swarm: LocalSwarm, a, b) -> None:
        raise NotImplementedError

    def cut_client(self, swarm: LocalSwarm, server) -> None:
        raise NotImplementedError("loopback: the client's link to a server cannot be cut")

    def restore_client(self, swarm: LocalSwarm, server) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NamespaceFaults(LoopbackFaults):
    """The DHT node and each server on an emulated host of its own; this process is the bridge host."""

    name = "netns"

    def __init__(self, hosts: int):
        from shardnet import netns

        reason = netns.available()
        if reason is not None:
            raise SystemExit(f"namespace mode: {reason} (or run with --loopback)")
        self.network = netns.HostNetwork(hosts)

    def swarm_options(self) -> dict:
        return {"network": self.network}

    def supports(self, kind: str) -> bool:
        return True

    def cut_link(self, swarm, a, b) -> None:
        self.network.cut(swarm.host_of(a), swarm.host_of(b))

    def restore_link(self, swarm, a, b) -> None:
        self.network.restore(swarm.host_of(a), swarm.host_of(b))

    def cut_client(self, swarm, server) -> None:
        self.network.cut(self.network.bridge, swarm.host_of(server))

    def restore_client(self, swarm, server) -> None:
        self.network.restore(self.network.bridge, swarm.host_of(server))

    def close(self) -> None:
        self.network.close()
