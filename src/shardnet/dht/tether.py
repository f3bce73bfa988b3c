"""TetheredDHT: a hivemind DHT whose process, and the p2pd under it, never outlive the process that made it.

hivemind runs a DHT node in a forked child process (``hivemind.DHT`` is a ``multiprocessing`` process)
that starts the Go daemon ``p2pd``. Every DHT in shardnet (servers, clients, ``shardnet dht``) is a
``TetheredDHT``; its ``run()`` (in the child, before hivemind's own ``run()``) does three things:

* **Default SIGTERM, no wakeup fd.** The fork inherits the owner's signal setup. A server's asyncio
  loop had installed a no-op Python handler for SIGTERM that writes to the loop's wakeup socket, so
  the child ignored SIGTERM: hivemind's "terminate it the hard way" did nothing and multiprocessing's
  exit-time ``terminate()`` + ``join()`` kept the stopped server alive until SIGKILL. A SIGTERM sent
  to the child also stopped the owner through that socket.
* **A process group of its own** (POSIX ``setpgid``; p2pd, started later, inherits it). A signal to
  the owner's group (Ctrl-C at a terminal, ``kill -TERM -PGID``) then reaches the owner only, which
  drains, announces DRAINING and OFFLINE through a DHT that still works, and shuts it down in order.
  Before, p2pd died at once (the daemon exits on SIGTERM) and the announcements went nowhere.
* **A watcher thread tied to the owner.** ``daemon=True`` acts only when the owner exits normally; after
  a SIGKILL the child ran on forever. The thread blocks on multiprocessing's parent sentinel (a pipe
  whose other end only the owner holds: readable at once when the owner dies) and checks that we
  have not been re-parented, once a second, in case another process inherited that pipe end. When
  the owner is gone it terminates our own children (p2pd) and exits. This is plain POSIX and works
  whichever thread started the DHT, which ``PR_SET_PDEATHSIG`` would not: that signal fires when the
  forking *thread* exits, and clients may start a DHT from a short-lived worker thread.

p2pd needs nothing of its own: hivemind keeps a persistent control connection to it, and the daemon
closes itself when its last persistent connection closes, so it exits about two seconds after its DHT
process dies, however that process died (SIGKILL included; tests/test_stopping.py checks it).

What this cannot protect: a SIGTERM sent to *every* process (systemd's KillMode=control-group without
an ExecStop) kills p2pd before the owner can announce. The owner
then still drains and exits cleanly (announcements time out), and its record expires after its TTL;
``servers/shardnet.service`` signals the main process first so that announcements get through.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import wait

import hivemind
import psutil

logger = logging.getLogger(__name__)
_OWNER_CHECK_S = 1.0  # how often the watcher also checks that the owner is still our parent
_CHILD_EXIT_S = 5.0  # how long p2pd gets to exit on SIGTERM before SIGKILL


class TetheredDHT(hivemind.DHT):
    """A ``hivemind.DHT`` whose process (and p2pd) exit when the owner process dies, however it dies."""

    def run(self) -> None:  # runs in the child process
        _detach_from_owner_signals()
        parent = multiprocessing.parent_process()  # set for every multiprocessing child, forked ones too
        owner_pid = parent.pid if parent is not None else os.getppid()
        sentinel = parent.sentinel if parent is not None else None
        threading.Thread(
            target=_exit_with_owner, args=(owner_pid, sentinel), name="dht-owner-watch", daemon=True
        ).start()
        super().run()

    def shutdown(self) -> None:
        """hivemind's shutdown, then wait until the process is gone (SIGKILL as a last resort)."""
        super().shutdown()  # asks the node to stop, waits shutdown_timeout, then SIGTERM
        if self.pid is None:  # never started
            return
        self.join(self.shutdown_timeout)
        if self.is_alive():
            logger.warning("DHT process %s ignored SIGTERM; killing it", self.pid)
            self.kill()
            self.join()


def _detach_from_owner_signals() -> None:
    """Undo the signal setup inherited from the owner and leave its process group."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)  # the owner's event loop socket: not ours to write to
    except ValueError:  # not the main thread: nothing was inherited
        pass
    if hasattr(os, "setpgid"):
        # In a background group, writing to a terminal with `stty tostop` would stop us: ignore SIGTTOU.
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.setpgid(0, 0)
        except OSError as exc:  # e.g. a session leader; the watcher still ties us to the owner
            logger.debug("DHT process stays in its owner's process group: %s", exc)


def _exit_with_owner(owner_pid: int, sentinel: int | None) -> None:
    """Block until the owner process is gone, then stop our children (p2pd) and exit at once."""
    while os.getppid() == owner_pid:
        if sentinel is not None:
            if wait([sentinel], timeout=_OWNER_CHECK_S):
                break  # end of file: the owner's end of the pipe closed, so the owner died
        else:
            threading.Event().wait(_OWNER_CHECK_S)
    logger.warning("the process that started this DHT node (pid %d) is gone; stopping", owner_pid)
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=_CHILD_EXIT_S)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    os._exit(0)
