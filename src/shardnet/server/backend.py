"""SpanBackend: checks every request against the span's limits, then runs the blocks. No gRPC here."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from shardnet.devices import HOST
from shardnet.errors import InvalidRequestError, ModelMismatchError
from shardnet.models import SpanInputs, SpanModule
from shardnet.server.compute_queue import ComputeQueue
from shardnet.server.prefix_reuse import BLOCK_TOKENS, PrefixStore, block_digests
from shardnet.server.sessions import Session
from shardnet.server.throughput import ThroughputMeter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpanLimits:
    """What the backend accepts; requests outside these are refused before any work."""

    model_id: str
    start: int
    end: int
    hidden_size: int
    max_batch_size: int
    max_length: int  # longest session and longest unary forward, positions
    max_position: int  # positions must be below this (the model's max_position_embeddings)


@dataclass(frozen=True)
class StepInput:
    hidden_states: torch.Tensor  # [batch, new, hidden]
    attention_mask: torch.Tensor | None  # [batch, new] 0/1, or None for no padding
    position_ids: torch.Tensor | None  # [batch, new] int64, or None for consecutive positions
    hypo_ids: torch.Tensor | None = None  # [batch] int64 rows to reorder the cache by first, or None


class SpanBackend:
    """Runs a span for every session. Compute is serial (one span uses all its torch threads), taken
    per chunk of at most ``max_chunk_tokens`` (batch x positions) in arrival order, so a long prefill
    lets other sessions' decode steps in between its chunks; decode steps that queued meanwhile run as
    one forward pass (up to ``max_chunk_tokens`` rows)."""

    def __init__(
        self,
        span: SpanModule,
        dtype: torch.dtype,
        limits: SpanLimits,
        max_chunk_tokens: int = 1024,
        device: torch.device = HOST,
        batching: bool = True,
        compute: ComputeQueue | None = None,
        prefix: PrefixStore | None = None,
    ):
        self.span = span
        self.dtype = dtype
        self.device = device  # where the span's weights and every session's KV cache live
        self.limits = limits
        self.max_chunk_tokens = max_chunk_tokens
        self.batching = batching  # run concurrent sessions' decode steps as one forward pass
        # The thread every forward pass runs on (the server's, which also loaded the weights), or a new one.
        self.compute = compute or ComputeQueue(max_batch_rows=max_chunk_tokens)
        self.throughput = ThroughputMeter(limits.end - limits.start)
        self.prefix = prefix  # kept prompt prefixes (server/prefix_reuse.py); None: none kept

    # ---- checks (cheap, before any work) ----

    def check_model(self, model_id: str) -> None:
        if model_id != self.limits.model_id:
            raise ModelMismatchError(f"this server holds model {self.limits.model_id}, not {model_id!r}")

    def check_span(self, start: int, end: int) -> None:
        if not self.limits.start <= start < end <= self.limits.end:
            raise InvalidRequestError(
                f"span {start}:{end} is not a non-empty part of this server's blocks "
                f"{self.limits.start}:{self.limits.end}"
            )

    def check_session_shape(self, batch_size: int, max_length: int) -> None:
        if not 1 <= batch_size <= self.limits.max_batch_size:
            raise InvalidRequestError(f"batch_size {batch_size} must be 1..{self.limits.max_batch_size}")
        if not 1 <= max_length <= self.limits.max_length:
            raise InvalidRequestError(f"max_length {max_length} must be 1..{self.limits.max_length}")

    def check_step(self, step: StepInput, batch_size: int, position: int, max_length: int) -> None:
        """``position``: the positions the cache keeps before this step's (after any rollback)."""
        hidden = step.hidden_states
        if hidden.dim() != 3 or hidden.shape[0] != batch_size or hidden.shape[2] != self.limits.hidden_size:
            raise InvalidRequestError(
                f"hidden_states shape {list(hidden.shape)} must be [{batch_size}, new, {self.limits.hidden_size}]"
            )
        new = hidden.shape[1]
        if new < 1:
            raise InvalidRequestError("hidden_states carries no positions")
        if position + new > max_length:
            raise InvalidRequestError(
                f"{position} + {new} positions exceed the session's max_length {max_length}"
            )
        if step.attention_mask is not None:
            mask = step.attention_mask
            if list(mask.shape) != [batch_size, new]:
                raise InvalidRequestError(
                    f"attention_mask shape {list(mask.shape)} must be [{batch_size}, {new}]"
                )
            if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
                raise InvalidRequestError("attention_mask must hold only 0 and 1")
        if step.position_ids is not None:
            ids = step.position_ids
            if list(ids.shape) != [batch_size, new] or ids.dtype != torch.int64:
                raise InvalidRequestError(f"position_ids must be int64 of shape [{batch_size}, {new}]")
            if new and (int(ids.min()) < 0 or int(ids.max()) >= self.limits.max_position):
                raise InvalidRequestError(f"position_ids must lie in 0..{self.limits.max_position - 1}")
        if step.hypo_ids is not None:
            rows = step.hypo_ids
            if list(rows.shape) != [batch_size] or rows.dtype != torch.int64:
                raise InvalidRequestError(f"hypo_ids must be int64 of shape [{batch_size}]")
            if int(rows.min()) < 0 or int(rows.max()) >= batch_size:
                raise InvalidRequestError(f"hypo_ids must lie in 0..{batch_size - 1}")

    # ---- compute: in chunks of at most max_chunk_tokens, each under the fair compute lock ----

    def forward(self, step: StepInput, start: int, end: int) -> tuple[torch.Tensor, float]:
        """Run blocks start:end over full sequences. Returns (hidden states, compute seconds).

        Longer than one chunk, it runs chunk by chunk over a throwaway KV cache, like a session's prefill.
        """
        batch, length = step.hidden_states.shape[:2]
        positions = step.position_ids
        if positions is None:
            positions = torch.arange(length).unsqueeze(0).expand(batch, -1)  # [batch, seq]
        mask = None if step.attention_mask is None else step.attention_mask.to(torch.int64)
        if length <= self.chunk_positions(batch):
            return self.compute.run(
                partial(self._run, step.hidden_states, SpanInputs(mask, positions), None, start, end)
            )
        cache = self.span.new_cache()
        outs, compute_s = [], 0.0
        for first, last in self._chunks(batch, length):
            inputs = SpanInputs(None if mask is None else mask[:, :last], positions[:, first:last])
            out, chunk_s = self.compute.run(
                partial(self._run, step.hidden_states[:, first:last], inputs, cache, start, end)
            )
            outs.append(out)
            compute_s += chunk_s
        return torch.cat(outs, dim=1), compute_s  # [batch, seq, hidden]

    def rewind(self, session: Session, keep: int, rows: torch.Tensor | None) -> None:
        """Before a step: keep the cache's first ``keep`` positions, then reorder its rows by ``rows``.

        Generation asks for these between two steps (assisted decoding drops rejected draft tokens, beam
        search reorders its beams); the client sends them with the next step, so they cost no round trip.
        """
        if keep < session.position:
            self.span.crop_cache(session.cache, session.start, session.end, keep)
            session.position = keep
            if session.attention_mask is not None:
                session.attention_mask = session.attention_mask[:, :keep]
        if rows is not None:
            self.span.reorder_cache(session.cache, session.start, session.end, rows.to(self.device))
            if session.attention_mask is not None:
                session.attention_mask = session.attention_mask[rows]

    def step(self, session: Session, step: StepInput, keep: int | None = None) -> tuple[torch.Tensor, float]:
        """Run one step of a session, extending its KV cache and padding mask chunk by chunk. A decode
        step (one new position) may share its forward pass with other sessions' decode steps.

        ``keep``: first roll the cache back to that many positions (None: keep all), then reorder its
        rows by ``step.hypo_ids`` (see ``rewind``); on the compute thread, like all work on the cache."""
        keep = session.position if keep is None else keep
        batch, new = step.hidden_states.shape[:2]
        if new == 1 and self.batching:
            key = (session.start, session.end, step.hidden_states.dtype)
            return self.compute.run_batched(key, (session, step, keep), batch, self._decode_together)
        if self.prefix is not None and _starts_plainly(session, step, keep, self.prefix):
            return self._first_step_with_prefix(session, step)
        return self._step_in_chunks(session, step, keep)

    def _first_step_with_prefix(self, session: Session, step: StepInput) -> tuple[torch.Tensor, float]:
        """A session's first step: start from the longest kept prefix, compute the rest, keep its blocks."""
        hidden, store = step.hidden_states, self.prefix
        hit = store.lookup(prefix_digests(store, session, hidden))
        kept, outs, compute_s = hit.positions, [], 0.0
        if kept:
            layers = [
                (keys.to(self.device), values.to(self.device), seen) for keys, values, seen in hit.layers()
            ]
            self.compute.run(
                partial(self.span.import_cache, session.cache, session.start, session.end, layers)
            )
            self._advance(session, kept, None, 0.0)
            outs.append(hit.outputs())
        if kept < hidden.shape[1]:
            out, compute_s = self._step_in_chunks(session, StepInput(hidden[:, kept:], None, None), kept)
            outs.append(out)
        else:
            session.steps += 1
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [batch, new, hidden]
        if len(hit.digests) > len(hit.blocks):
            layers = self.compute.run(
                partial(self.span.export_cache, session.cache, session.start, session.end)
            )
            store.keep(hit, layers, out)
        return out, compute_s

    def _step_in_chunks(self, session: Session, step: StepInput, keep: int) -> tuple[torch.Tensor, float]:
        batch, new = step.hidden_states.shape[:2]
        if keep < session.position or step.hypo_ids is not None:
            self.compute.run(partial(self.rewind, session, keep, step.hypo_ids))
        past = session.position
        positions, mask = self._session_inputs(session, step)
        outs, compute_s = [], 0.0
        for first, last in self._chunks(batch, new):
            inputs = SpanInputs(None if mask is None else mask[:, : past + last], positions[:, first:last])
            out, chunk_s = self.compute.run(
                partial(
                    self._run,
                    step.hidden_states[:, first:last],
                    inputs,
                    session.cache,
                    session.start,
                    session.end,
                )
            )
            self._advance(session, past + last, mask, chunk_s)
            outs.append(out)
            compute_s += chunk_s
        session.steps += 1
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), compute_s  # [batch, new, hidden]

    def _decode_together(
        self, items: list[tuple[Session, StepInput, int]]
    ) -> list[tuple[torch.Tensor, float]]:
        """One decode step of each session (same span), as one forward pass over all their rows."""
        for session, step, keep in items:
            self.rewind(session, keep, step.hypo_ids)
        sessions = [session for session, _, _ in items]
        start, end = sessions[0].start, sessions[0].end
        own = [self._session_inputs(session, step) for session, step, _ in items]
        cache = None
        if len(items) > 1:
            frame = max(session.position for session in sessions)
            sizes = [session.batch_size for session in sessions]
            cache = self.span.stack_caches([session.cache for session in sessions], sizes, start, end, frame)
        if cache is None:  # alone, or a span that cannot batch: one by one
            results = []
            for (session, step, _), (positions, mask) in zip(items, own, strict=True):
                out, compute_s = self._run(
                    step.hidden_states, SpanInputs(mask, positions), session.cache, start, end
                )
                self._advance(session, session.position + 1, mask, compute_s)
                session.steps += 1
                results.append((out, compute_s))
            return results
        masks = []  # each session's padding mask, left-padded with zeros to the frame: [rows, frame + 1]
        for session, (_, mask) in zip(sessions, own, strict=True):
            if mask is None:
                mask = torch.ones(session.batch_size, session.position + 1, dtype=torch.int64)
            masks.append(torch.nn.functional.pad(mask, (frame - session.position, 0)))
        hidden = torch.cat([step.hidden_states for _, step, _ in items])  # [rows, 1, hidden]
        positions = torch.cat([positions for positions, _ in own])  # [rows, 1]
        out, compute_s = self._run(hidden, SpanInputs(torch.cat(masks), positions), cache, start, end)
        results, first = [], 0
        for session, (_, mask) in zip(sessions, own, strict=True):
            self._advance(session, session.position + 1, mask, compute_s)
            session.steps += 1
            results.append((out[first : first + session.batch_size], compute_s))
            first += session.batch_size
        return results

    @staticmethod
    def _session_inputs(session: Session, step: StepInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's positions [batch, new], and the padding mask of every position once it is done
        ([batch, past + new] 0/1; None while the session never sent any padding)."""
        batch, new = step.hidden_states.shape[:2]
        past = session.position
        positions = step.position_ids
        if positions is None:
            positions = torch.arange(past, past + new).unsqueeze(0).expand(batch, -1)  # [batch, new]
        if step.attention_mask is None and session.attention_mask is None:
            return positions, None
        old = session.attention_mask
        if old is None:
            old = torch.ones(batch, past, dtype=torch.int64)
        added = step.attention_mask
        added = torch.ones(batch, new, dtype=torch.int64) if added is None else added.to(torch.int64)
        return positions, torch.cat([old, added], dim=1)

    @staticmethod
    def _advance(session: Session, position: int, mask: torch.Tensor | None, compute_s: float) -> None:
        """The cache now holds ``position`` positions: keep the session's view of it the same."""
        session.position = position
        if mask is not None:
            session.attention_mask = mask[:, :position]
        session.compute_s += compute_s

    def chunk_positions(self, batch: int) -> int:
        """Positions per compute chunk for this batch size (at least one)."""
        return max(1, self.max_chunk_tokens // batch)

    def _chunks(self, batch: int, length: int) -> list[tuple[int, int]]:
        size = self.chunk_positions(batch)
        return [(first, min(first + size, length)) for first in range(0, length, size)]

    def _run(
        self, hidden: torch.Tensor, inputs: SpanInputs, cache: object | None, start: int, end: int
    ) -> tuple[torch.Tensor, float]:
        """Inputs arrive on the host in the session's wire dtype; they go to the span's device and dtype,
        and the output comes back to the host in the wire dtype (cast on the device: fewer bytes to copy).
        The copy back waits for the device, so the time taken is the step's real compute time."""
        began = time.perf_counter()
        wire_dtype = hidden.dtype
        if self.device != HOST:
            mask = None if inputs.attention_mask is None else inputs.attention_mask.to(self.device)
            inputs = SpanInputs(mask, inputs.position_ids.to(self.device))
        out = self.span.run(hidden.to(self.device, self.dtype), inputs, cache, start, end)
        out = out.to(wire_dtype).to(HOST)  # [batch, new, hidden]
        return out, time.perf_counter() - began

    def probe_throughput(self) -> float:
        """Time whole-span decode steps at batch 1 to start the announced throughput; returns steps/s."""
        return self.throughput.probe(self.decode_step_runner(), host_compute=self.device == HOST)

    def decode_step_runner(self) -> Callable[[int], None]:
        """``run_step(position)``: one whole-span decode step at batch 1 over a fresh cache (probes)."""
        cache = self.span.new_cache()
        hidden = torch.zeros(
            1, 1, self.limits.hidden_size, dtype=self.dtype, device=self.device
        )  # [batch, new, hidden]

        def run_step(position: int) -> None:
            inputs = SpanInputs(None, torch.tensor([[position]], device=self.device))
            # Back to the host as a real step's output goes: that waits for a GPU's queued kernels.
            self.span.run(hidden, inputs, cache, self.limits.start, self.limits.end).to(HOST)

        return run_step


def prefix_digests(store: PrefixStore, session: Session, hidden: torch.Tensor) -> list[bytes]:
    """The hash chain naming this first step's blocks, in the session's client's scope."""
    return block_digests(hidden, store.seed(session.client, session.start, session.end, hidden))


def _starts_plainly(session: Session, step: StepInput, keep: int, store: PrefixStore) -> bool:
    """A first step a kept prefix can stand for: from position 0, no padding, the default positions."""
    hidden = step.hidden_states
    if not store.enabled or session.position or keep or step.hypo_ids is not None:
        return False
    if hidden.shape[1] < BLOCK_TOKENS or session.attention_mask is not None:
        return False
    if step.attention_mask is not None and not bool(step.attention_mask.all()):
        return False
    if step.position_ids is None:
        return True
    return bool((step.position_ids == torch.arange(hidden.shape[1])).all())
