"""A template process: shardnet's server stack imported once, so a local swarm forks its processes ready.

A ``shardnet serve`` process spends about 4.3 of its first 4.9 CPU-seconds importing torch, transformers'
modeling code and hivemind, and a ``shardnet dht`` process 1.8 of 2.3 (measured on the 2-core CI
machine). ``LocalSwarm`` (tests, ``shardnet demo``, ``servers/local_swarm.py``) starts many of them, so it
asks this template instead: one process that has imported all of that, and forks a child per command.
A forked server is ready in about 0.5 s, having used 0.2 CPU-seconds of its own.

Each child runs exactly what ``python -m shardnet ARGS`` runs (``runpy``: ``shardnet/__main__.py``), in a session of
its own, with its own environment, stdin on /dev/null and stdout/stderr on its log file (or on a pipe
the launcher reads), and optionally on an emulated host of its own (a network namespace, ``shardnet/netns.py``),
entered before it runs anything. A child can also run a Python file instead (``python FILE ARGS``), e.g. a
test's client on a host of its own. What cannot differ from a fresh interpreter: environment variables that the
libraries read at import (``shardnet/process_env.py`` sets them in the template first).

Lifetimes follow ``LocalSwarm``'s rules for plain children. The template dies with the process that
started it (``PR_SET_PDEATHSIG``) and exits when that process closes its socket; a child learns of the
template's death the same way (``shardnet.cli`` asks for SIGTERM then, as for any parent). The template
reaps its children and reports their exit status, so ``ForkedProcess`` answers ``poll``/``wait`` like
``subprocess.Popen``. Linux only: elsewhere ``LocalSwarm`` starts plain processes.

The protocol, over a Unix socket pair: the launcher sends one JSON line per command (with the write end
of a pipe attached when it wants the child's stdout); the template answers ``{"started": pid}`` or
``{"error": text}``, and later ``{"exited": pid, "returncode": code}`` (negative: killed by a signal).
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from shardnet import netns
from shardnet.import_noise import IMPORT_NOISE

logger = logging.getLogger(__name__)

# What the template imports before it forks anything: everything a server and a DHT node load at start.
PRELOAD = (
    "shardnet.cli",
    "shardnet.server.app",
    "shardnet.models.decoder",
    "shardnet.models.transformers_loading",
    "transformers.modeling_utils",
    "transformers.masking_utils",
    "transformers.conversion_mapping",
    "transformers.core_model_loading",
)
_NOISY_AT_IMPORT = IMPORT_NOISE  # warnings about absent CUDA kernels (shardnet/import_noise.py)
_FDS_PER_MESSAGE = 1
# The exit status of a child whose template died before reaping it (it then cannot be known).
UNKNOWN_EXIT = 255


def supported() -> bool:
    return sys.platform.startswith("linux")


# ---- the launcher's side -----------------------------------------------------------------------------


class ForkedProcess:
    """A command forked by the template, with the part of ``subprocess.Popen``'s interface LocalSwarm and
    its callers use: ``pid``, ``args``, ``stdout``, ``returncode``, ``poll``, ``wait``, ``send_signal``,
    ``terminate``, ``kill``."""

    def __init__(self, template: TemplateProcess, pid: int, args: list[str], stdout):
        self._template = template
        self.pid = pid
        self.args = args
        self.stdout = stdout

    @property
    def returncode(self) -> int | None:
        return self._template.returncode(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._template.wait(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # exited a moment ago; its status is on its way
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class TemplateProcess:
    """The launcher's handle on its template process (one per launching process: ``shared()``)."""

    _shared: TemplateProcess | None = None
    _shared_lock = threading.Lock()

    def __init__(self):
        self._socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._send_lock = threading.Lock()  # one request at a time: answers come in request order
        self._state = threading.Condition()
        self._started: list[dict] = []  # answers to requests, in order
        self._returncodes: dict[int, int | None] = {}  # pid -> exit status (None while running)
        self._alive = True
        self.process: subprocess.Popen | None = None
        launched = threading.Event()
        # The reader thread starts the template and lives as long as this process: the template's
        # PR_SET_PDEATHSIG fires when the *thread* that forked it ends, not only the process.
        self._reader = threading.Thread(
            target=self._run, args=(theirs, launched), name="process-template", daemon=True
        )
        self._reader.start()
        launched.wait()
        if self.process is None:
            raise RuntimeError("could not start the process template")

    def _run(self, theirs: socket.socket, launched: threading.Event) -> None:
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shardnet.process_template", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                # A session of its own, as every LocalSwarm child: Ctrl-C at the launcher's terminal goes
                # to the launcher, which stops the children in order, not to the template.
                start_new_session=True,
                # Children get streams of their own. The template's would hold the launcher's terminal or
                # pipes open (a reader waiting for EOF) and show import-time noise there.
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
            launched.set()
        self._read()

    @classmethod
    def shared(cls) -> TemplateProcess:
        """This process's template, started on first use (and again if it died)."""
        with cls._shared_lock:
            if cls._shared is None or not cls._shared._alive:
                cls._shared = cls()
            return cls._shared

    def spawn(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        log_path: Path | None,
        stdout_pipe: bool = False,
        netns: str | None = None,
        script: Path | None = None,
    ) -> ForkedProcess:
        """Fork ``shardnet ARGV``; its stdout and stderr go to ``log_path`` (None: /dev/null), or its
        stdout to a pipe whose read end becomes ``ForkedProcess.stdout`` (text) with ``stdout_pipe``.
        ``netns``: the network namespace it runs in (``netns.HostNetwork``); None: the template's.
        ``script``: run this Python file with ARGV instead (``python SCRIPT ARGV``)."""
        request = {
            "argv": list(argv),
            "env": env,
            "log": str(log_path) if log_path else None,
            "stdout": stdout_pipe,
            "netns": netns,
            "script": str(script) if script else None,
        }
        read_end = write_end = None
        if stdout_pipe:
            read_end, write_end = os.pipe()
        message = (json.dumps(request) + "\n").encode()
        try:
            with self._send_lock:
                if write_end is not None:
                    socket.send_fds(self._socket, [message], [write_end])
                else:
                    self._socket.sendall(message)
                answer = self._next_answer()
        except OSError as exc:
            if read_end is not None:
                os.close(read_end)
            raise RuntimeError(f"the process template is gone: {exc}") from exc
        finally:
            if write_end is not None:
                os.close(write_end)
        if "error" in answer:
            if read_end is not None:
                os.close(read_end)
            raise RuntimeError(f"the process template could not start {argv[:1]}: {answer['error']}")
        stdout = os.fdopen(read_end, "r") if read_end is not None else None
        command = [str(script)] if script else ["-m", "shardnet"]
        return ForkedProcess(self, answer["started"], [sys.executable, *command, *argv], stdout)

    def _next_answer(self) -> dict:
        with self._state:
            while not self._started:
                if not self._alive:
                    raise OSError("it exited")
                self._state.wait()
            return self._started.pop(0)

    def returncode(self, pid: int) -> int | None:
        return self.wait(pid, 0)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self._state:
            self._state.wait_for(lambda: self._returncodes.get(pid) is not None or not self._alive, timeout)
            code = self._returncodes.get(pid)
            orphaned = code is None and not self._alive
        if orphaned and _wait_gone(pid, timeout):  # the template is gone: nobody reports this exit now
            with self._state:
                code = self._returncodes[pid] = UNKNOWN_EXIT
        return code

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self._socket.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                message = json.loads(line)
                with self._state:
                    if "exited" in message:
                        self._returncodes[message["exited"]] = message["returncode"]
                    else:
                        if "started" in message:
                            self._returncodes[message["started"]] = None
                        self._started.append(message)
                    self._state.notify_all()
        with self._state:
            self._alive = False
            self._state.notify_all()


def _wait_gone(pid: int, timeout: float | None) -> bool:
    """Whether process ``pid`` has ended (or is a zombie nobody reaps) within ``timeout`` seconds."""
    import psutil

    try:
        psutil.Process(pid).wait(timeout)
    except psutil.TimeoutExpired:
        return False
    except psutil.NoSuchProcess:
        pass
    return True


# ---- the template's side ----------------------------------------------------------------------------


def _serve(sock: socket.socket) -> None:
    """Answer fork requests until the launcher closes the socket; report each child's exit."""
    import selectors

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears of exits
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    buffer, fds = b"", []
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_read:
                os.read(wake_read, 4096)
                _report_exits(sock)
                continue
            data, received, _, _ = socket.recv_fds(sock, 65536, _FDS_PER_MESSAGE)
            if not data:
                return
            buffer += data
            fds += received
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                stdout_fd = fds.pop(0) if request["stdout"] and fds else None
                _answer(sock, _fork(request, stdout_fd, closing=(sock.fileno(), wake_read, wake_write)))
                if stdout_fd is not None:
                    os.close(stdout_fd)
        _report_exits(sock)


def _report_exits(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _answer(sock, {"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})


def _answer(sock: socket.socket, message: dict) -> None:
    sock.sendall((json.dumps(message) + "\n").encode())


def _fork(request: dict, stdout_fd: int | None, closing: tuple[int, ...]) -> dict:
    try:
        log = (
            os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if request["log"] else None
        )
        pid = os.fork()
    except OSError as exc:
        return {"error": str(exc)}
    if pid:
        if log is not None:
            os.close(log)
        return {"started": pid}
    # The child: from here on it is `python -m shardnet ARGV` (or `python SCRIPT ARGV`), and never returns
    # into the template's loop.
    code = 1
    try:
        for fd in closing:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()  # a session of its own, as LocalSwarm gives every child (see launch.py)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(stdout_fd if stdout_fd is not None else (log if log is not None else null), 1)
        os.dup2(log if log is not None else null, 2)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own standard streams
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        if request.get("netns"):  # single-threaded still, and no socket open: all it starts lives there
            netns.enter(request["netns"])
        os.environ.clear()
        os.environ.update(request["env"], SHARDNET_PARENT_PID=str(os.getppid()))
        if request.get("script"):  # what `python SCRIPT ARGV` runs
            sys.argv = [request["script"], *request["argv"]]
            sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))
            runpy.run_path(request["script"], run_name="__main__")
            code = 0  # it ended without sys.exit
        else:  # what `python -m shardnet ARGV` runs
            sys.argv = ["shardnet", *request["argv"]]
            runpy.run_module("shardnet", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child's crash is reported as python's would be
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its children restore Python's own handler
    sock = socket.socket(fileno=int(argv[0]))
    launcher = os.getppid()
    _die_with_parent()
    if os.getppid() != launcher:  # the launcher died before we asked
        return
    from shardnet.process_env import apply_defaults

    apply_defaults()  # before torch and hivemind load, as in every shardnet process
    for noisy in _NOISY_AT_IMPORT:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    if threading.active_count() != 1:  # a fork copies one thread only: the others' locks could be held
        raise RuntimeError(f"the process template runs {threading.active_count()} threads after its imports")
    _serve(sock)


if __name__ == "__main__":
    main(sys.argv[1:])
