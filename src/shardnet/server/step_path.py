"""The step path: one session step, from the request that carries it to the reply, in the order it runs.

    serve_step                        on the session's stream thread (or, pushed, the thread that waited)
      1. check      position, tensors (decode, finite), shapes against the session
      2. begin      the session is busy: the idle reaper leaves it alone
      3. run_step   the compute, on the compute queue (server/compute_queue.py):
                      a decode step of one position  -> decode_together, batched with other sessions'
                      a first step with a kept prefix -> with_prefix (server/prefix_reuse.py)
                      anything else                  -> in_chunks, at most --max-chunk-tokens at a time
                    each first rolls the cache back / reorders its rows if asked (rewind), and after
                    each forward pass the session's view of its cache moves on (advance)
      4. end        not busy, last active now
      5. reply      the output, the position the session holds, and where the step's time went here:
                    queue (arrival to output, less compute), compute, send (encoding, the push request),
                    push (its round trip to the next server's acknowledgement)
      6. push       the output to the next server of the route, when the client asked for it

``SpanBackend`` (server/backend.py) holds the span, its limits and checks and runs one forward pass
(``run_span``); the servicer (server/servicer.py) reads requests off streams and calls ``serve_step``.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import torch

from shardnet.errors import SessionError
from shardnet.models import SpanInputs
from shardnet.server.backend import SpanBackend, StepInput
from shardnet.server.prefix_reuse import BLOCK_TOKENS, PrefixStore, block_digests
from shardnet.server.push import PushSender
from shardnet.server.sessions import Session, SessionTable
from shardnet.wire import pb
from shardnet.wire.tensors import FLOAT_DTYPES, check_finite, deserialize, serialize

logger = logging.getLogger(__name__)
_MASK_DTYPES = frozenset({"int64", "bool"})
_POSITION_DTYPES = frozenset({"int64"})


def step_input(
    hidden: pb.Tensor, mask: pb.Tensor, positions: pb.Tensor, present: set[str], rows: pb.Tensor | None = None
) -> StepInput:
    """A request's tensors, decoded and checked for NaN and Inf (refused, not passed through: see the
    README's "what you expose"). ``present``: the names of the fields the request set."""
    hidden_states = deserialize(hidden, FLOAT_DTYPES)
    check_finite(hidden, "hidden_states")
    return StepInput(
        hidden_states=hidden_states,
        attention_mask=deserialize(mask, _MASK_DTYPES) if "attention_mask" in present else None,
        position_ids=deserialize(positions, _POSITION_DTYPES) if "position_ids" in present else None,
        hypo_ids=deserialize(rows, _POSITION_DTYPES) if "hypo_ids" in present else None,
    )


def present_fields(message) -> set[str]:
    return {descriptor.name for descriptor, _ in message.ListFields()}


def serve_step(
    backend: SpanBackend,
    sessions: SessionTable,
    push: PushSender | None,
    session: Session,
    request: pb.Step,
    arrived: float | None = None,
) -> pb.InferenceResponse:
    """Steps 1 to 6 above for one ``Step`` of ``session``; raises a ``ShardnetError`` on bad input.
    ``arrived``: ``time.perf_counter()`` when the step reached this server (its stream message, or its
    push), so the reply's ``queue_s`` covers any wait before this call; now when not given."""
    arrived = time.perf_counter() if arrived is None else arrived
    if request.position > session.position:
        raise SessionError(
            f"step at position {request.position}, but session {session.short_id} holds {session.position}"
        )
    step = step_input(
        request.hidden_states,
        request.attention_mask,
        request.position_ids,
        present_fields(request),
        request.hypo_ids,
    )
    backend.check_step(step, session.batch_size, request.position, session.max_length)
    sessions.begin_step(session)
    try:
        out, compute_s = run_step(backend, session, step, keep=request.position)
    finally:
        sessions.end_step(session)
    ready = time.perf_counter()
    result = pb.StepResult(
        step_id=request.step_id,
        hidden_states=serialize(out),
        compute_s=compute_s,
        position=session.position,
        queue_s=max(ready - arrived - compute_s, 0.0),
    )
    if len(request.push):  # the next server's step is on the critical path: pushed before replying here
        if push is None:
            result.push_error = "this server does not push"
            result.send_s = time.perf_counter() - ready
        else:  # the client waits on the last server, not on this answer: the ack costs it nothing
            pushed = push.push(request, result.hidden_states)
            result.push_error, result.send_s = pushed.error, pushed.sent - ready
            result.push_s, result.push_one_way_s = pushed.round_trip_s, pushed.one_way_s
    else:
        result.send_s = time.perf_counter() - ready
    result.replied_at_s = time.perf_counter()
    result.arrived_at_s, result.handle_s = arrived, result.replied_at_s - arrived
    return pb.InferenceResponse(step=result)


def run_step(
    backend: SpanBackend, session: Session, step: StepInput, keep: int | None = None
) -> tuple[torch.Tensor, float]:
    """Run one step of a session, extending its KV cache and padding mask; returns (output [batch, new,
    hidden], compute seconds). A decode step (one new position) may share its forward pass with other
    sessions' decode steps; a first step may start from a kept prefix.

    ``keep``: first roll the cache back to that many positions (None: keep all), then reorder its rows
    by ``step.hypo_ids`` (see ``rewind``); on the compute thread, like all work on the cache."""
    keep = session.position if keep is None else keep
    batch, new = step.hidden_states.shape[:2]
    if new == 1 and backend.batching:
        # Sessions with different adapters never share a pass (server/adapters.py): each stays exact.
        key = (session.start, session.end, step.hidden_states.dtype, session.adapter)
        return backend.compute.run_batched(
            key, (session, step, keep), batch, partial(decode_together, backend)
        )
    if backend.prefix is not None and _starts_plainly(session, step, keep, backend.prefix):
        return with_prefix(backend, session, step)
    return in_chunks(backend, session, step, keep)


def with_prefix(backend: SpanBackend, session: Session, step: StepInput) -> tuple[torch.Tensor, float]:
    """A session's first step: start from the longest kept prefix, compute the rest, keep its blocks."""
    hidden, store, device = step.hidden_states, backend.prefix, backend.device
    hit = store.lookup(
        block_digests(hidden, store.seed(session.client, session.start, session.end, hidden, session.adapter))
    )
    kept, outs, compute_s = hit.positions, [], 0.0
    if kept:
        layers = [(keys.to(device), values.to(device), seen) for keys, values, seen in hit.layers()]
        backend.compute.run(
            partial(backend.span.import_cache, session.cache, session.start, session.end, layers)
        )
        advance(session, kept, None, 0.0)
        outs.append(hit.outputs())
    if kept < hidden.shape[1]:
        out, compute_s = in_chunks(backend, session, StepInput(hidden[:, kept:], None, None), kept)
        outs.append(out)
    else:
        session.steps += 1
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [batch, new, hidden]
    if len(hit.digests) > len(hit.blocks):
        export = partial(backend.span.export_cache, session.cache, session.start, session.end)
        store.keep(hit, backend.compute.run(export), out)
    return out, compute_s


def in_chunks(
    backend: SpanBackend, session: Session, step: StepInput, keep: int
) -> tuple[torch.Tensor, float]:
    """A step of any length, at most ``--max-chunk-tokens`` (batch x positions) per forward pass, so other
    sessions' decode steps run between a long prefill's chunks."""
    batch, new = step.hidden_states.shape[:2]
    if keep < session.position or step.hypo_ids is not None:
        backend.compute.run(partial(rewind, backend, session, keep, step.hypo_ids))
    past = session.position
    positions, mask = session_inputs(session, step)
    outs, compute_s = [], 0.0
    for first, last in backend.chunks(batch, new):
        inputs = SpanInputs(
            None if mask is None else mask[:, : past + last],
            positions[:, first:last],
            adapter=session.adapter,
        )
        hidden = step.hidden_states[:, first:last]
        run = partial(backend.run_span, hidden, inputs, session.cache, session.start, session.end)
        out, chunk_s = backend.compute.run(run)
        advance(session, past + last, mask, chunk_s)
        outs.append(out)
        compute_s += chunk_s
    session.steps += 1
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), compute_s  # [batch, new, hidden]


def decode_together(
    backend: SpanBackend, items: list[tuple[Session, StepInput, int]]
) -> list[tuple[torch.Tensor, float]]:
    """One decode step of each session (same span), as one forward pass over all their rows."""
    for session, step, keep in items:
        rewind(backend, session, keep, step.hypo_ids)
    sessions = [session for session, _, _ in items]
    start, end = sessions[0].start, sessions[0].end
    own = [session_inputs(session, step) for session, step, _ in items]
    cache = None
    if len(items) > 1:
        frame = max(session.position for session in sessions)
        sizes = [session.batch_size for session in sessions]
        cache = backend.span.stack_caches([session.cache for session in sessions], sizes, start, end, frame)
    if cache is None:  # alone, or a span that cannot batch: one by one
        results = []
        for (session, step, _), (positions, mask) in zip(items, own, strict=True):
            out, compute_s = backend.run_span(
                step.hidden_states,
                SpanInputs(mask, positions, adapter=session.adapter),
                session.cache,
                start,
                end,
            )
            advance(session, session.position + 1, mask, compute_s)
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
    inputs = SpanInputs(torch.cat(masks), positions, adapter=sessions[0].adapter)  # one adapter a batch
    out, compute_s = backend.run_span(hidden, inputs, cache, start, end)
    results, first = [], 0
    for session, (_, mask) in zip(sessions, own, strict=True):
        advance(session, session.position + 1, mask, compute_s)
        session.steps += 1
        results.append((out[first : first + session.batch_size], compute_s))
        first += session.batch_size
    return results


def rewind(backend: SpanBackend, session: Session, keep: int, rows: torch.Tensor | None) -> None:
    """Before a step: keep the cache's first ``keep`` positions, then reorder its rows by ``rows``.

    Generation asks for these between two steps (assisted decoding drops rejected draft tokens, beam
    search reorders its beams); the client sends them with the next step, so they cost no round trip.
    """
    if keep < session.position:
        backend.span.crop_cache(session.cache, session.start, session.end, keep)
        session.position = keep
        if session.attention_mask is not None:
            session.attention_mask = session.attention_mask[:, :keep]
    if rows is not None:
        backend.span.reorder_cache(session.cache, session.start, session.end, rows.to(backend.device))
        if session.attention_mask is not None:
            session.attention_mask = session.attention_mask[rows]


def session_inputs(session: Session, step: StepInput) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def advance(session: Session, position: int, mask: torch.Tensor | None, compute_s: float) -> None:
    """The cache now holds ``position`` positions: keep the session's view of it the same."""
    session.position = position
    if mask is not None:
        session.attention_mask = mask[:, :position]
    session.compute_s += compute_s


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
