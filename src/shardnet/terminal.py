"""What ``shardnet demo`` and ``shardnet chat`` share at a terminal: streaming an answer, Ctrl-C handling."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import TextIO

import torch
from transformers import TextStreamer


class AnswerStreamer(TextStreamer):
    """TextStreamer that writes to ``out`` and records when each generated token arrived.

    When ``interrupted`` is set (Ctrl-C came, but a library swallowed its KeyboardInterrupt), the next
    token raises KeyboardInterrupt again, so the generation stops.
    """

    def __init__(self, tokenizer, out: TextIO, interrupted: threading.Event):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.interrupted = interrupted
        self.token_times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if self.interrupted.is_set():
            raise KeyboardInterrupt
        is_prompt = self.next_tokens_are_prompt
        super().put(value)
        if not is_prompt:
            self.token_times.append(time.perf_counter())

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def say(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()


def record_sigint(interrupted: threading.Event):
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered, so the next token stops the
    generation even if the first KeyboardInterrupt landed inside a library that caught it. Returns the
    handler it replaced (None off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_sigint(signum, frame) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, on_sigint)


def restore_sigint(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """For clean-up that a second Ctrl-C must not cut short (servers left behind, sessions left open)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
