"""Driving generation for one API request: a worker thread runs ``model.generate`` for each choice in
turn, and a streamer turns tokens into text deltas that reach the event loop through an asyncio queue.

Stop strings are checked on the decoded text as it grows; text that could be the start of a stop string is
held back until it is not. A stop string found, or a cancel (the HTTP client went away), makes the
streamer's ``put`` raise, so ``generate`` unwinds and its server session closes at once.

Seeded sampling uses torch's global generator (``generate`` takes no generator), so a seeded request holds
the sampling gate alone while it runs; unseeded sampling requests share it; greedy ones never wait.

As each choice ends (before its Finish event), the job hands a ``ChoiceReport`` (its tokens' arrival times,
route and session step timings) to its ``on_choice``: the gateway's metrics and swarm page read those.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.generation import BaseStreamer

from shardnet.gateway.activity import ChoiceReport

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChoicePlan:
    """What one request asks the swarm for; every prompt gets ``n`` choices."""

    prompts: Sequence[Sequence[int]]  # token ids per prompt
    n: int  # choices per prompt
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    stop: Sequence[str]
    seed: int | None


@dataclass(frozen=True)
class Delta:
    index: int  # choice index: prompt * n + choice
    text: str


@dataclass(frozen=True)
class Finish:
    index: int
    reason: str  # "stop" (end of turn or a stop string) or "length"
    completion_tokens: int


class _Cancelled(Exception):
    """Raised from a streamer's put to end a generate() early."""


class SamplingGate:
    """Seeded requests run alone among sampling requests; unseeded sampling requests run together."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    def acquire(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._exclusive = True
            else:
                self._cond.wait_for(lambda: not self._exclusive)
                self._shared += 1

    def release(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._cond.notify_all()


class _ChoiceStreamer(BaseStreamer):
    """Tokens of one choice -> text deltas; raises _Cancelled at a stop string or on cancel."""

    def __init__(self, tokenizer, index: int, stop: Sequence[str], cancel: threading.Event, emit):
        self.tokenizer = tokenizer
        self.index = index
        self.stop = list(stop)
        self.cancel = cancel
        self.emit = emit
        self.ids: list[int] = []
        self.began = time.perf_counter()  # the choice's start: made just before its session opens
        self.offsets_s: list[float] = []  # per token in ids, seconds from began to its arrival
        self.sent = 0  # characters of the decoded text already emitted
        self.prompt_seen = False
        self.hit_stop = False

    def put(self, value: torch.Tensor) -> None:
        if self.cancel.is_set():
            raise _Cancelled
        if not self.prompt_seen:  # generate() puts the prompt first
            self.prompt_seen = True
            return
        tokens = [int(t) for t in value.reshape(-1).tolist()]
        arrived_s = time.perf_counter() - self.began
        self.ids.extend(tokens)
        self.offsets_s.extend(arrived_s for _ in tokens)
        text = self._text()
        cut = _first_stop(text, self.stop)
        if cut is not None:
            self._send(text[:cut])
            self.hit_stop = True
            raise _Cancelled
        hold = _held_back(text, self.stop)
        self._send(text[: len(text) - hold])

    def end(self) -> None:
        self._send(self._text())

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _send(self, upto: str) -> None:
        if len(upto) > self.sent:
            self.emit(Delta(self.index, upto[self.sent :]))
            self.sent = len(upto)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` not to send yet: an incomplete character, or a stop's prefix."""
    if text.endswith("\ufffd"):  # a multi-byte character split across tokens
        return len(text) - len(text.rstrip("\ufffd"))
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return hold


class GenerationJob:
    """One request's generations in a worker thread; ``events()`` yields Delta and Finish in order."""

    def __init__(
        self,
        model,
        tokenizer,
        plan: ChoicePlan,
        gate: SamplingGate,
        on_choice: Callable[[ChoiceReport], None],
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.plan = plan
        self.gate = gate
        self.on_choice = on_choice  # called in the worker as each choice ends, before its Finish event
        self.cancel = threading.Event()
        self.eos_ids = _eos_ids(model, tokenizer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, name="shardnet-gateway-generate", daemon=True)
        self._thread.start()

    async def events(self) -> AsyncIterator[Delta | Finish]:
        """Deltas and finishes as they come; raises the generation's error, if any."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        """Make the worker stop at its next token (the client went away)."""
        self.cancel.set()

    def _emit(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel.set()

    def _run(self) -> None:
        plan = self.plan
        sampling = plan.temperature > 0
        exclusive = plan.seed is not None
        try:
            if sampling:
                self.gate.acquire(exclusive)
            try:
                if sampling and plan.seed is not None:
                    torch.manual_seed(plan.seed)
                for p, ids in enumerate(plan.prompts):
                    for c in range(plan.n):
                        if self.cancel.is_set():
                            return
                        self._one(p * plan.n + c, ids, prompt_tokens=len(ids) if c == 0 else 0)
            finally:
                if sampling:
                    self.gate.release(exclusive)
        except BaseException as exc:  # handed to the event loop, which answers with an error
            self._emit(exc)
        finally:
            self._emit(None)

    def _one(self, index: int, prompt: Sequence[int], prompt_tokens: int) -> None:
        """One choice; ``prompt_tokens``: what it adds to the prompt count (0 for a prompt's later choices)."""
        plan = self.plan
        input_ids = torch.tensor([list(prompt)], dtype=torch.long)  # [1, prompt]
        kwargs: dict = {"max_new_tokens": plan.max_new_tokens, "do_sample": plan.temperature > 0}
        if plan.temperature > 0:
            kwargs.update(temperature=plan.temperature, top_p=plan.top_p, top_k=0)
        started_at = time.time()
        streamer = _ChoiceStreamer(self.tokenizer, index, plan.stop, self.cancel, self._emit)
        try:
            with self.model.inference_session(max_length=len(prompt) + plan.max_new_tokens) as session:
                try:
                    self.model.generate(
                        input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs
                    )
                finally:  # inside the session: hops still pending are filled in place when it closes
                    report = ChoiceReport(
                        started_at=started_at,
                        token_offsets_s=tuple(streamer.offsets_s),
                        prompt_tokens=prompt_tokens,
                        route=self.model.last_route,
                        steps=list(session.step_timings),
                    )
                    self.on_choice(report)
        except _Cancelled:
            if not streamer.hit_stop:
                logger.info("generation cancelled after %d tokens (client gone)", len(streamer.ids))
                return
        if streamer.hit_stop or (streamer.ids and streamer.ids[-1] in self.eos_ids):
            reason = "stop"
        else:
            reason = "length"
        logger.debug(
            "choice %d: %d tokens in %.2f s (%s)",
            index,
            len(streamer.ids),
            time.perf_counter() - streamer.began,
            reason,
        )
        self._emit(Finish(index, reason, len(streamer.ids)))


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for eos in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
    return ids
