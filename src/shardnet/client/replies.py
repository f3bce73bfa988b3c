"""ReplyBoard: the replies of a session's streams, read as they come and waited on together.

gRPC's blocking stream iterator reads one stream at a time and has no per-message timeout. A pushed step
needs both: the route's last server answers the step, but a server before it may report first that its
push failed, or never answer at all (frozen). So each stream gets a reader thread that posts every reply
(or the stream's end, or its error) on the session's board, and the session waits for whichever of its
streams speaks first, until a deadline of its choosing (its hedge, see ``client/failover.py``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import grpc

STREAM_ENDED = object()  # posted when a stream ends without an error


class Posted(NamedTuple):
    stream: object
    item: object  # a reply, an error, or STREAM_ENDED
    arrived: float  # time.perf_counter() when the stream's reader got it (the step timings' clock)


class ReplyBoard:
    def __init__(self):
        self._posted: dict[object, deque] = {}  # stream -> (item, arrived) not read yet
        self._gone: set[int] = set()  # ids of closed streams, whose late replies are dropped
        self._changed = threading.Condition()

    def read(self, stream: object, replies: Iterator) -> threading.Thread:
        """Start a thread posting everything ``replies`` (a gRPC response iterator) yields for ``stream``."""

        def pump() -> None:
            try:
                for reply in replies:
                    self._post(stream, reply)
                self._post(stream, STREAM_ENDED)
            except grpc.RpcError as error:
                self._post(stream, error)

        thread = threading.Thread(target=pump, name="shardnet-replies", daemon=True)
        thread.start()
        return thread

    def _post(self, stream: object, item: object) -> None:
        with self._changed:
            if id(stream) in self._gone:
                return
            self._posted.setdefault(stream, deque()).append((item, time.perf_counter()))
            self._changed.notify_all()

    def wait(self, streams: Iterable[object], deadline: float) -> Posted | None:
        """The first unread item of any of ``streams`` (in their order), waiting until ``deadline``
        (``time.monotonic()``); None when it passes first."""
        streams = list(streams)
        with self._changed:
            while True:
                for stream in streams:
                    posted = self._posted.get(stream)
                    if posted:
                        return Posted(stream, *posted.popleft())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def forget(self, stream: object) -> None:
        """Drop what a closed stream still has on the board."""
        with self._changed:
            self._posted.pop(stream, None)
            self._gone.add(id(stream))
