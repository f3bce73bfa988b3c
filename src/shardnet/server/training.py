"""The backward path: a client training through the swarm asks for the gradient with respect to a span's
input, given the gradient with respect to its output (``Backward``).

The server decodes and checks the request as it would a ``Forward`` (model, span, shapes, dtypes, NaN
and Inf), checks the output gradient against the input (same shape and dtype, finite), runs the span's
forward again with autograd a few rows at a time (``SpanBackend.backward``) and returns the input's
gradient. It keeps nothing between calls, and its weights never change: a request that asks for that
(``update_weights``) is refused. Deep prompt tuning's prompts (``prompts``: the span's blocks' share)
are checked here for ``Forward`` too, and their gradient comes back with the input's.
"""

from __future__ import annotations

import torch

from shardnet.errors import InvalidRequestError
from shardnet.server.backend import SpanBackend
from shardnet.server.step_path import present_fields, step_input
from shardnet.wire import pb
from shardnet.wire.tensors import FLOAT_DTYPES, check_finite, deserialize, serialize


def serve_backward(backend: SpanBackend, request: pb.BackwardRequest) -> pb.BackwardResponse:
    """Check ``request`` and compute the gradient; raises a ``ShardnetError`` on bad input."""
    if request.update_weights:
        raise InvalidRequestError(
            "update_weights: a server never changes its weights; train client-side parameters "
            "(prompts, adapters) with the gradients it returns"
        )
    backend.check_model(request.model_id)
    backend.check_span(request.span.start, request.span.end)
    present = present_fields(request)
    step = step_input(request.hidden_states, request.attention_mask, request.position_ids, present)
    hidden = step.hidden_states
    if hidden.dim() != 3:
        raise InvalidRequestError(
            f"hidden_states must have shape [batch, seq, hidden], got {list(hidden.shape)}"
        )
    batch, length = hidden.shape[:2]
    backend.check_session_shape(batch, length)
    backend.check_step(step, batch, 0, length)
    if "grad_outputs" not in present:
        raise InvalidRequestError("grad_outputs is required: the gradient with respect to the span's output")
    grad_outputs = deserialize(request.grad_outputs, FLOAT_DTYPES)
    check_finite(request.grad_outputs, "grad_outputs")
    if grad_outputs.shape != hidden.shape or grad_outputs.dtype != hidden.dtype:
        raise InvalidRequestError(
            f"grad_outputs must match hidden_states: {list(hidden.shape)} {hidden.dtype}, got "
            f"{list(grad_outputs.shape)} {grad_outputs.dtype}"
        )
    prompts = deep_prompts(request, present, request.span.end - request.span.start, hidden)
    backend.check_adapter(request.adapter)
    grad_inputs, grad_prompts, compute_s = backend.backward(
        step, grad_outputs, request.span.start, request.span.end, prompts, request.adapter
    )
    reply = pb.BackwardResponse(grad_inputs=serialize(grad_inputs), compute_s=compute_s)
    if grad_prompts is not None:
        reply.grad_prompts.CopyFrom(serialize(grad_prompts))
    return reply


def deep_prompts(request, present: set[str], blocks: int, hidden: torch.Tensor) -> torch.Tensor | None:
    """A Forward's or Backward's deep prompts, checked against its span and hidden states, or None:
    [blocks, pre, hidden], 1 <= pre <= seq, the hidden states' dtype, finite."""
    if "prompts" not in present:
        return None
    prompts = deserialize(request.prompts, FLOAT_DTYPES)
    check_finite(request.prompts, "prompts")
    seq, width = hidden.shape[1], hidden.shape[2]
    if prompts.dim() != 3 or prompts.shape[0] != blocks or prompts.shape[2] != width:
        raise InvalidRequestError(
            f"prompts must be [{blocks} blocks, pre, {width}] for this span, got {list(prompts.shape)}"
        )
    if not 1 <= prompts.shape[1] <= seq or prompts.dtype != hidden.dtype:
        raise InvalidRequestError(
            f"prompts must cover 1..{seq} positions in {hidden.dtype}, got {prompts.shape[1]} in {prompts.dtype}"
        )
    return prompts
