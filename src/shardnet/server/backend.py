"""SpanBackend: checks every request against the span's limits, then runs the blocks. No gRPC here."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from shardnet.devices import HOST
from shardnet.errors import InvalidRequestError, ModelMismatchError
from shardnet.models import SpanInputs, SpanModule
from shardnet.server.adapters import ServerAdapters
from shardnet.server.compute_queue import ComputeQueue
from shardnet.server.prefix_reuse import PrefixStore
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
    """A span and what may ask it for work: its limits, the checks against them, one forward pass on the
    compute queue (``run_span``) and unary ``forward``s in chunks. A session's step goes through
    ``server/step_path.py``, which uses these."""

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
        adapters: ServerAdapters | None = None,
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
        self.adapters = adapters  # LoRA adapters (server/adapters.py); None: none loaded

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters.names) if self.adapters is not None else []

    def check_adapter(self, name: str) -> None:
        if not name:
            return
        if self.adapters is None:
            raise InvalidRequestError(f"adapter {name!r} is not served here (this server has none)")
        self.adapters.check(name)

    def _adapter(self, inputs: SpanInputs):
        """The context a forward pass runs in: its adapter active (none: the base model)."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.active(inputs.adapter)

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

    def forward(
        self, step: StepInput, start: int, end: int, prompts: torch.Tensor | None = None, adapter: str = ""
    ) -> tuple[torch.Tensor, float]:
        """Run blocks start:end over full sequences. Returns (hidden states, compute seconds).

        Longer than one chunk, it runs chunk by chunk over a throwaway KV cache, like a session's prefill.
        ``prompts`` [blocks, pre, hidden]: deep prompt tuning's, added before each block to the first
        positions (``SpanInputs.prompts``).
        """
        batch, length = step.hidden_states.shape[:2]
        positions = step.position_ids
        if positions is None:
            positions = torch.arange(length).unsqueeze(0).expand(batch, -1)  # [batch, seq]
        mask = None if step.attention_mask is None else step.attention_mask.to(torch.int64)
        if length <= self.chunk_positions(batch):
            inputs = SpanInputs(mask, positions, prompts, adapter)
            return self.compute.run(partial(self.run_span, step.hidden_states, inputs, None, start, end))
        cache = self.span.new_cache()
        outs, compute_s = [], 0.0
        for first, last in self.chunks(batch, length):
            chunk_prompts = None
            if prompts is not None and first < prompts.shape[1]:
                chunk_prompts = prompts[:, first:last]  # the prompted positions of this chunk
            inputs = SpanInputs(
                None if mask is None else mask[:, :last], positions[:, first:last], chunk_prompts, adapter
            )
            out, chunk_s = self.compute.run(
                partial(self.run_span, step.hidden_states[:, first:last], inputs, cache, start, end)
            )
            outs.append(out)
            compute_s += chunk_s
        return torch.cat(outs, dim=1), compute_s  # [batch, seq, hidden]

    def backward(
        self,
        step: StepInput,
        grad_outputs: torch.Tensor,
        start: int,
        end: int,
        prompts: torch.Tensor | None = None,
        adapter: str = "",
    ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Gradients with respect to the input of blocks start:end and to the deep ``prompts`` (or None),
        given the gradient with respect to their output, over full sequences; returns them and the
        compute seconds. The forward runs again with autograd, a few rows at a time (at most
        max_chunk_tokens positions, or one row), so memory stays bounded; nothing is kept, and the
        weights never change."""
        batch, length = step.hidden_states.shape[:2]
        positions = step.position_ids
        if positions is None:
            positions = torch.arange(length).unsqueeze(0).expand(batch, -1)  # [batch, seq]
        mask = None if step.attention_mask is None else step.attention_mask.to(torch.int64)
        rows = max(1, self.max_chunk_tokens // max(length, 1))
        grads, grad_prompts, compute_s = [], None, 0.0
        for first in range(0, batch, rows):
            last = min(first + rows, batch)
            inputs = SpanInputs(
                None if mask is None else mask[first:last], positions[first:last], prompts, adapter
            )
            grad, chunk_prompts, chunk_s = self.compute.run(
                partial(
                    self._input_gradient,
                    step.hidden_states[first:last],
                    inputs,
                    grad_outputs[first:last],
                    start,
                    end,
                )
            )
            grads.append(grad)
            if chunk_prompts is not None:  # every row adds the same prompts: their gradients add up
                grad_prompts = chunk_prompts if grad_prompts is None else grad_prompts + chunk_prompts
            compute_s += chunk_s
        return torch.cat(grads), grad_prompts, compute_s  # [batch, seq, hidden], [blocks, pre, hidden]

    def _input_gradient(
        self, hidden: torch.Tensor, inputs: SpanInputs, grad_outputs: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        began = time.perf_counter()
        wire_dtype = hidden.dtype
        inputs = self._on_device(inputs)
        with self._adapter(inputs):
            grad, grad_prompts = self.span.input_gradient(
                hidden.to(self.device, self.dtype),
                inputs,
                grad_outputs.to(self.device, self.dtype),
                start,
                end,
            )
        if grad_prompts is not None:
            grad_prompts = grad_prompts.to(wire_dtype).to(HOST)
        return grad.to(wire_dtype).to(HOST), grad_prompts, time.perf_counter() - began

    def _on_device(self, inputs: SpanInputs) -> SpanInputs:
        """A call's inputs on the span's device (and its prompts in its dtype)."""
        if self.device == HOST and (inputs.prompts is None or inputs.prompts.dtype == self.dtype):
            return inputs
        mask = None if inputs.attention_mask is None else inputs.attention_mask.to(self.device)
        prompts = None if inputs.prompts is None else inputs.prompts.to(self.device, self.dtype)
        return SpanInputs(mask, inputs.position_ids.to(self.device), prompts, inputs.adapter)

    def chunk_positions(self, batch: int) -> int:
        """Positions per compute chunk for this batch size (at least one)."""
        return max(1, self.max_chunk_tokens // batch)

    def chunks(self, batch: int, length: int) -> list[tuple[int, int]]:
        size = self.chunk_positions(batch)
        return [(first, min(first + size, length)) for first in range(0, length, size)]

    def run_span(
        self, hidden: torch.Tensor, inputs: SpanInputs, cache: object | None, start: int, end: int
    ) -> tuple[torch.Tensor, float]:
        """Inputs arrive on the host in the session's wire dtype; they go to the span's device and dtype,
        and the output comes back to the host in the wire dtype (cast on the device: fewer bytes to copy).
        The copy back waits for the device, so the time taken is the step's real compute time."""
        began = time.perf_counter()
        wire_dtype = hidden.dtype
        inputs = self._on_device(inputs)
        with self._adapter(inputs):
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
