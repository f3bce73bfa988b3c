"""SpanBackend: checks every request against the span's limits, then runs the blocks. No gRPC here."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from shardnet.devices import HOST
from shardnet.errors import InvalidRequestError, ModelMismatchError
from shardnet.models import SpanInputs, SpanModule
from shardnet.server.fair_lock import FairLock
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
    per chunk of at most ``max_chunk_tokens`` (batch x positions) under a FIFO lock, so a long prefill
    lets other sessions' decode steps in between its chunks."""

    def __init__(
        self,
        span: SpanModule,
        dtype: torch.dtype,
        limits: SpanLimits,
        max_chunk_tokens: int = 1024,
        device: torch.device = HOST,
    ):
        self.span = span
        self.dtype = dtype
        self.device = device  # where the span's weights and every session's KV cache live
        self.limits = limits
        self.max_chunk_tokens = max_chunk_tokens
        self.compute_lock = FairLock()
        self.throughput = ThroughputMeter(limits.end - limits.start)

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
            with self.compute_lock:
                return self._run(step.hidden_states, SpanInputs(mask, positions), None, start, end)
        cache = self.span.new_cache()
        outs, compute_s = [], 0.0
        for first, last in self._chunks(batch, length):
            with self.compute_lock:
                out, chunk_s = self._run(
                    step.hidden_states[:, first:last],
                    SpanInputs(None if mask is None else mask[:, :last], positions[:, first:last]),
                    cache,
                    start,
                    end,
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

    def step(self, session: Session, step: StepInput) -> tuple[torch.Tensor, float]:
        """Run one step of a session, extending its KV cache and padding mask chunk by chunk."""
        batch, new = step.hidden_states.shape[:2]
        past = session.position
        positions = step.position_ids
        if positions is None:
            positions = torch.arange(past, past + new).unsqueeze(0).expand(batch, -1)  # [batch, new]
        mask = None  # [batch, past + new] 0/1, once any padding was sent in this session
        if step.attention_mask is not None or session.attention_mask is not None:
            old = session.attention_mask
            if old is None:
                old = torch.ones(batch, past, dtype=torch.int64)
            new_mask = step.attention_mask
            new_mask = (
                torch.ones(batch, new, dtype=torch.int64) if new_mask is None else new_mask.to(torch.int64)
            )
            mask = torch.cat([old, new_mask], dim=1)
        outs, compute_s = [], 0.0
        for first, last in self._chunks(batch, new):
            with self.compute_lock:
                out, chunk_s = self._run(
                    step.hidden_states[:, first:last],
                    SpanInputs(None if mask is None else mask[:, : past + last], positions[:, first:last]),
                    session.cache,
                    session.start,
                    session.end,
                )
            # The cache now holds past + last positions: keep the session's view of it the same.
            session.position = past + last
            if mask is not None:
                session.attention_mask = mask[:, : past + last]
            session.compute_s += chunk_s
            outs.append(out)
            compute_s += chunk_s
        session.steps += 1
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), compute_s  # [batch, new, hidden]

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
        cache = self.span.new_cache()
        hidden = torch.zeros(
            1, 1, self.limits.hidden_size, dtype=self.dtype, device=self.device
        )  # [batch, new, hidden]

        def run_step(position: int) -> None:
            inputs = SpanInputs(None, torch.tensor([[position]], device=self.device))
            # Back to the host as a real step's output goes: that waits for a GPU's queued kernels.
            self.span.run(hidden, inputs, cache, self.limits.start, self.limits.end).to(HOST)

        return self.throughput.probe(run_step, host_compute=self.device == HOST)
