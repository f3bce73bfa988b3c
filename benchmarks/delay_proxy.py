"""A TCP proxy that adds network latency (and optionally a bandwidth cap) in front of local servers.

    python benchmarks/delay_proxy.py --target 50051 --target 50052 --delay-ms 25 --bandwidth-mbps 100

Listens on 127.0.0.1 (one free port per ``--target``) and forwards bytes both ways to
127.0.0.1:TARGET. Each chunk read from one side is delivered to the other at its arrival time plus the
one-way delay (plus, with a bandwidth cap, the time the chunk waits for and takes on the link), in
order. Delivery is scheduled, not slept chunk after chunk, so a stream of chunks is delayed without
being slowed: throughput is not capped by the delay. A request/reply round trip through the proxy
therefore costs 2 x delay.

What it does not emulate: TCP's own dynamics over a long link (slow start, window limits, loss).
Each side talks TCP over loopback to the proxy, so only the application's bytes are delayed.

The process prints ``LISTEN_PORT TARGET_PORT`` per target, then ``ready``. On stdin it takes commands,
one per line, and answers one line each: ``set DELAY_MS BANDWIDTH_MBPS`` (0 = no cap) -> ``ok``;
``stats`` -> a JSON object (connections accepted, bytes each way). It exits when stdin closes, so it
never outlives the process that started it. ``DelayProxy`` is that process as seen from Python.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 64 * 1024  # largest read from one side at a time


@dataclass
class Link:
    """The emulated link, shared by every connection and direction; ``set`` changes it for new chunks."""

    delay_s: float = 0.0  # one-way delay
    bandwidth_bps: float = 0.0  # bits per second each direction of each connection may carry; 0 = no cap


@dataclass
class Counters:
    connections: int = 0  # accepted so far
    bytes_to_server: int = 0
    bytes_to_client: int = 0


class Direction:
    """One direction of one connection: when each chunk arrives at the far side."""

    def __init__(self, link: Link):
        self.link = link
        self.free_at = 0.0  # loop time the (capped) link finishes sending what it already has

    def delivery_time(self, arrived: float, n_bytes: int) -> float:
        if not self.link.bandwidth_bps:
            return arrived + self.link.delay_s
        start = max(arrived, self.free_at)  # queued behind earlier chunks on the same link
        self.free_at = start + n_bytes * 8 / self.link.bandwidth_bps
        return self.free_at + self.link.delay_s


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link, count: Callable[[int], None]
) -> None:
    """Copy reader -> writer, each chunk delivered at its scheduled time, in order; EOF is passed on."""
    loop = asyncio.get_running_loop()
    direction = Direction(link)
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def receive() -> None:
        try:
            while data := await reader.read(CHUNK_BYTES):
                queue.put_nowait((direction.delivery_time(loop.time(), len(data)), data))
        finally:
            queue.put_nowait(None)

    receiving = asyncio.create_task(receive())
    try:
        while (item := await queue.get()) is not None:
            due, data = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            count(len(data))
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    finally:
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await receiving


async def _serve_connection(
    client_reader, client_writer, target_port: int, link: Link, counters: Counters
) -> None:
    counters.connections += 1
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
    except OSError:
        client_writer.close()
        return

    def to_server(n: int) -> None:
        counters.bytes_to_server += n

    def to_client(n: int) -> None:
        counters.bytes_to_client += n

    pumps = [
        asyncio.create_task(_pump(client_reader, server_writer, link, to_server)),
        asyncio.create_task(_pump(server_reader, client_writer, link, to_client)),
    ]
    try:
        # Both directions until both ended; a reset on either side ends the connection.
        done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    finally:
        for writer in (client_writer, server_writer):
            writer.close()


async def _control(link: Link, counters: Counters) -> None:
    """Commands on stdin until it closes."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while line := (await stdin.readline()).decode():
        words = line.split()
        if words[:1] == ["set"] and len(words) == 3 and all(_non_negative(w) for w in words[1:]):
            link.delay_s, link.bandwidth_bps = float(words[1]) / 1000, float(words[2]) * 1e6
            answer = "ok"
        elif words == ["stats"]:
            answer = json.dumps(vars(counters))
        else:
            answer = f"error: unknown command {line.strip()!r}"
        print(answer, flush=True)


def _non_negative(word: str) -> bool:
    try:
        return float(word) >= 0
    except ValueError:
        return False


async def run(targets: list[int], link: Link) -> None:
    counters = Counters()
    servers = []
    for target in targets:

        async def handle(reader, writer, target: int = target) -> None:
            await _serve_connection(reader, writer, target, link, counters)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        print(server.sockets[0].getsockname()[1], target, flush=True)
    print("ready", flush=True)
    try:
        await _control(link, counters)
    finally:
        for server in servers:
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=int, action="append", required=True, help="127.0.0.1 port to front")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    parser.add_argument("--bandwidth-mbps", type=float, default=0.0, help="cap per direction; 0 = none")
    args = parser.parse_args()
    if args.delay_ms < 0 or args.bandwidth_mbps < 0:
        parser.error("--delay-ms and --bandwidth-mbps must be >= 0")
    asyncio.run(run(args.target, Link(args.delay_ms / 1000, args.bandwidth_mbps * 1e6)))


class DelayProxy:
    """A ``delay_proxy.py`` process fronting ``target_ports``: ``start()`` gives the ports to dial instead."""

    def __init__(self, target_ports: list[int], log_path: Path | None = None):
        self.target_ports = list(target_ports)
        self.log_path = log_path
        self.listen_ports: dict[int, int] = {}  # target port -> the proxy's port in front of it
        self._process: subprocess.Popen | None = None
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()  # its stdout, read by a thread of ours
        self._log = None

    def start(self, timeout_s: float = 30.0) -> dict[int, int]:
        args = [sys.executable, str(Path(__file__).resolve())]
        for port in self.target_ports:
            args += ["--target", str(port)]
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # A session of its own, as LocalSwarm's children: only stop() (or our death: stdin closes) ends it.
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read_stdout, args=(self._process.stdout,), daemon=True).start()
        try:
            while (line := self._read_line(timeout_s)) != "ready":
                listen, target = map(int, line.split())
                self.listen_ports[target] = listen
        except BaseException:
            self.stop()
            raise
        return self.listen_ports

    def set(self, delay_ms: float, bandwidth_mbps: float = 0.0) -> None:
        """One-way delay (each direction) and bandwidth cap for every chunk from now on."""
        self._command(f"set {delay_ms} {bandwidth_mbps}")

    def stats(self) -> dict:
        return json.loads(self._command("stats"))

    def _command(self, line: str) -> str:
        self._process.stdin.write(line + "\n")
        self._process.stdin.flush()
        answer = self._read_line(10.0)
        if answer.startswith("error"):
            raise RuntimeError(f"delay proxy: {answer}")
        return answer

    def _read_stdout(self, stdout) -> None:
        for line in stdout:
            self._lines.put(line.strip())
        self._lines.put("")  # it exited

    def _read_line(self, timeout_s: float) -> str:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"delay proxy said nothing in {timeout_s}s") from None
        if not line:
            raise RuntimeError(f"delay proxy exited with {self._process.wait()}")
        return line

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close its stdin (it exits on EOF); kill it if it does not."""
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> DelayProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
