"""Result verification: other holders of the same blocks compute a sampled fraction of each hop's steps
again, and a server outvoted is banned and its steps recomputed.

A session with ``verify_fraction`` F > 0 keeps, for each of its hops, a *witness*: a session of the same
blocks on other servers (never the hop's own). After each step, each hop is checked with probability F
(every hop at every step when F = 1). A check catches the witness up: it sends the witness every input
the hop was given since the last check (one prefill-like step, cheap next to as many decode steps) and
compares the witness's outputs with the hop's, position by position. So a check covers every position
since the previous one, not just the sampled step.

- **Agreement** is a relative error per position, ``|claimed - witness| / |witness|`` (L2 over the
  hidden size), at most ``tolerance(dtype)``; padding positions are not compared. The tolerance covers
  what honest servers differ by: one prefill against many decode steps, batched against alone, another
  CPU or GPU kernel (see ``TOLERANCE``).
- **A dispute** (some position beyond the tolerance) is settled by a third holder: a fresh session of
  the hop's blocks on servers that are neither the hop's nor the witness's, replaying everything the hop
  was given. The answer two of the three agree on wins; the third is suspected (``ServerTrust.suspect``:
  banned for the rest of the process, the evidence logged). When no third holder exists, or all three
  differ, nobody is suspected: one server's word never condemns another's.
- **Repair.** When the hop was wrong, its blocks are routed again (without it) and its whole history
  replayed, then every later hop is rebuilt from the corrected outputs, and the step returns the
  corrected output. With F = 1 every step is checked before it returns, so every output is exact even
  with a liar on the route.

What it does not guarantee: outputs returned between two checks of a hop may come from a liar (with
F = 0.05 a check of each hop comes every 20 steps on average; the positions are checked then, but the
tokens already chosen stay chosen), blocks that only one server holds are not checked, and servers that
collude (the hop's and its witness's lying alike) are not caught.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shardnet.client.history import GrowingBuffer
from shardnet.client.planner import RoutePlanner, SessionNeeds
from shardnet.client.routing import RouteHop
from shardnet.client.trust import ServerTrust
from shardnet.errors import ShardnetError

if TYPE_CHECKING:
    from shardnet.client.session import InferenceSession
    from shardnet.client.session_hops import SessionHop

logger = logging.getLogger(__name__)

# Largest relative L2 error per position that honest servers are allowed (measured in
# benchmarks/verification.py, README "Verified results"): a few dozen units in the last place of the
# activation dtype, so the same computation done as a prefill or as decode steps, batched or alone,
# always agrees, and a server computing anything else does not.
TOLERANCE = {
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 1e-1,
}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE[dtype]


def relative_error(claimed: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per position [batch, positions]: L2 of the difference over L2 of the reference; 0 where padded."""
    reference = reference.float()
    error = (claimed.float() - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)
    error = torch.nan_to_num(error, nan=float("inf"))  # a NaN where the reference has a number is wrong
    if mask is not None:
        error = error.masked_fill(mask == 0, 0.0)
    return error


@dataclass(frozen=True)
class Votes:
    """Three holders' outputs for the same inputs: the checked hop's, its witness's, and a third's."""

    hop: RouteHop
    witness_peers: frozenset[str]
    third_peers: frozenset[str]
    claimed: torch.Tensor  # [batch, positions, hidden] the hop's
    reference: torch.Tensor  # the witness's
    decider: torch.Tensor  # the third holder's


def vote(health: ServerTrust, votes: Votes, mask: torch.Tensor | None, tol: float, where: str) -> str | None:
    """Two of three agreeing outvote the third, who is suspected (the evidence logged); returns "hop" or
    "witness", whichever was outvoted, or None when no two agree or the witness that lost is several
    servers (which of them computed wrong is not known)."""
    hop_error = float(relative_error(votes.claimed, votes.decider, mask).max())
    witness_error = float(relative_error(votes.reference, votes.decider, mask).max())
    span = (votes.hop.start, votes.hop.end)
    evidence = (
        f"In {where}, relative errors against the third holder {_names(votes.third_peers)}: "
        f"..{votes.hop.peer_id[-6:]} {hop_error:.3g}, witness {_names(votes.witness_peers)} "
        f"{witness_error:.3g} (tolerance {tol:g}, {str(votes.claimed.dtype).removeprefix('torch.')})."
    )
    if witness_error <= tol < hop_error:
        health.suspect(votes.hop.peer_id, span, evidence)
        return "hop"
    if hop_error <= tol < witness_error and len(votes.witness_peers) == 1:
        (witness,) = votes.witness_peers
        health.suspect(witness, span, evidence)
        return "witness"
    logger.warning("no two of three holders of %d:%d agree; nobody is suspected. %s", *span, evidence)
    return None


def check_forward(
    hop: RouteHop,
    given: torch.Tensor,
    claimed: torch.Tensor,
    mask: torch.Tensor | None,
    planner: RoutePlanner,
    run: Callable[[list[RouteHop], torch.Tensor], torch.Tensor],
    tol: float,
) -> torch.Tensor:
    """A stateless forward's hop checked: other holders run ``given`` [batch, seq, hidden] through its
    blocks (``run``: a route and its input -> output); returns the output to go on with, which is the
    witness's when the hop was outvoted (and suspected)."""
    health, span, exclude = planner.health, (hop.start, hop.end), {hop.peer_id}
    drawn = not_drawn(planner, span, SessionNeeds(), frozenset(exclude), random)
    witness = planner.try_route(*span, SessionNeeds(), frozenset(exclude) | drawn)
    if witness is None:
        return claimed
    try:
        reference = run(witness, given)
    except ShardnetError as error:
        logger.info("forward: the witness of %s failed (%s); not checked", hop, error)
        return claimed
    error = float(relative_error(claimed, reference, mask).max())
    health.checked(error)
    if error <= tol:
        return claimed
    health.count("disputes")
    witness_peers = frozenset(h.peer_id for h in witness)
    used = frozenset(exclude | witness_peers)
    third = planner.try_route(
        *span, SessionNeeds(), used | not_drawn(planner, span, SessionNeeds(), used, random)
    )
    if third is None:
        logger.warning(
            "forward: %s and its witness %s disagree (relative error %.3g, tolerance %.3g) and no third "
            "holder can decide; nobody is suspected",
            hop,
            _names(witness_peers),
            error,
            tol,
        )
        return claimed
    try:
        decider = run(third, given)
    except ShardnetError as failed:
        logger.warning("forward: the third holder failed (%s); nobody is suspected", failed)
        return claimed
    third_peers = frozenset(h.peer_id for h in third)
    outvoted = vote(
        health,
        Votes(hop, witness_peers, third_peers, claimed, reference, decider),
        mask,
        tol,
        "a stateless forward",
    )
    if outvoted == "hop":
        health.count("recomputed")
        return reference
    return claimed


def not_drawn(
    planner: RoutePlanner, span: tuple[int, int], needs: SessionNeeds, exclude: frozenset[str], rng
) -> frozenset[str]:
    """The holders of the whole span to leave out so that one, drawn at random, is the witness. The
    cheapest route would pick the same servers every time, and a liar that is never the cheapest would
    never be asked. (When nobody holds the span alone: nothing left out, the cheapest chain serves.)"""
    holders = planner.holders(*span, needs, exclude)
    if not holders:
        return frozenset()
    return frozenset(holders) - {rng.choice(holders)}


@dataclass(eq=False)
class _Witness:
    session: InferenceSession  # the hop's blocks, on servers other than the hop's

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(hop.peer_id for hop in self.session.route)


class Verifier:
    """The checks of one inference session (see the module docstring)."""

    def __init__(self, session: InferenceSession, fraction: float, rng: random.Random | None = None):
        self.session = session
        self.fraction = fraction  # probability that a hop is checked after a step
        self.tolerance = tolerance(session.config.dtype)
        self._rng = rng or random.Random()
        self._witnesses: dict[SessionHop, _Witness] = {}
        self._outputs = GrowingBuffer(session.max_length)  # [batch, positions, hidden] the last hop's
        self._unverifiable: set[tuple[int, int]] = set()  # spans told (once) to have no other holder

    # ---- after each step ----

    def after_step(self, output: torch.Tensor) -> torch.Tensor:
        """Check the sampled hops of the step just taken; returns its output, recomputed if a hop lied."""
        self._outputs.append(output)
        new = output.shape[1]
        collected = False
        index = 0
        while index < len(self.session.hops):  # hops rebuilt by a repair are drawn for afresh
            hop = self.session.hops[index]
            index += 1
            if self._rng.random() >= self.fraction:
                continue
            if not collected:
                self.session.collect()  # every hop's answer to the step, into the histories compared
                self._drop_gone()
                collected = True
            self._check(hop)  # a liar's replacement takes its place, checked as well
        return self._outputs.view()[:, -new:].clone()

    def _check(self, hop: SessionHop) -> None:
        """Compare ``hop``'s outputs since its last check with its witness's; settle a dispute; repair."""
        while True:
            witness = self._witness(hop)
            if witness is None:
                return
            begin, end = witness.session.position, self.session.position
            mask = self.session.mask_history(begin, end)
            try:
                reference = witness.session.step(
                    hop.inputs.view()[:, begin:end], mask, self.session.position_history(begin, end)
                )
            except ShardnetError as error:
                logger.info(
                    "session=%s: witness of %s failed (%s); next check opens another",
                    self.session.short_id,
                    hop.hop,
                    error,
                )
                self._close(hop)
                return
            claimed = self._outputs_of(hop, begin, end)
            error = relative_error(claimed, reference, mask)
            self.session.health.checked(float(error.max()))
            if float(error.max()) <= self.tolerance:
                return
            replaced = self._dispute(hop, witness, claimed, reference, begin, error)
            if replaced is None:
                return
            hop = replaced  # the replacement is checked too: a second liar may hold the same blocks

    def _dispute(
        self,
        hop: SessionHop,
        witness: _Witness,
        claimed: torch.Tensor,
        reference: torch.Tensor,
        begin: int,
        error: torch.Tensor,
    ) -> SessionHop | None:
        """A third holder decides between ``hop`` and its witness; returns the hop that replaced a liar."""
        health, session = self.session.health, self.session
        health.count("disputes")
        end = session.position
        third = self._open(hop, exclude={hop.hop.peer_id} | witness.peers)
        if third is None:
            logger.warning(
                "session=%s: %s and its witness %s disagree on positions %d:%d (relative error %.3g, "
                "tolerance %.3g) and no third holder can decide; nobody is suspected",
                session.short_id,
                hop.hop,
                _names(witness.peers),
                begin,
                end,
                float(error.max()),
                self.tolerance,
            )
            self._close(hop)
            return None
        third_peers = third.peers
        try:
            decider = third.session.step(
                hop.inputs.view()[:, :end], session.mask_history(0, end), session.position_history(0, end)
            )[:, begin:end]
        except ShardnetError as error:
            logger.warning(
                "session=%s: the third holder failed (%s); nobody is suspected", session.short_id, error
            )
            self._close(hop)
            return None
        finally:
            third.session.close()
        outvoted = vote(
            health,
            Votes(hop.hop, witness.peers, third_peers, claimed, reference, decider),
            session.mask_history(begin, end),
            self.tolerance,
            f"session {session.short_id}, positions {begin}:{end}",
        )
        self._close(hop)
        return self._repair(hop) if outvoted == "hop" else None

    def _repair(self, liar: SessionHop) -> SessionHop:
        """Recompute the liar's blocks elsewhere and every later hop from the corrected outputs."""
        index = self.session.hops.index(liar)
        replacements, output = self.session.recompute_from(liar)
        for gone in list(self._witnesses):  # their inputs were wrong after the liar: opened anew
            if gone not in self.session.hops:
                self._close(gone)
        self._outputs.truncate(0)
        self._outputs.append(output)
        self.session.health.count("recomputed")
        logger.info(
            "session=%s: recomputed %d positions from blocks %d:%d on",
            self.session.short_id,
            output.shape[1],
            liar.hop.start,
            self.session.blocks[1],
        )
        return self.session.hops[index]

    # ---- witnesses ----

    def _witness(self, hop: SessionHop) -> _Witness | None:
        witness = self._witnesses.get(hop)
        if witness is not None and hop.hop.peer_id not in witness.peers:
            return witness
        self._close(hop)
        witness = self._open(hop, exclude={hop.hop.peer_id})
        if witness is not None:
            self._witnesses[hop] = witness
        return witness

    def _open(self, hop: SessionHop, exclude: set[str]) -> _Witness | None:
        """A session of ``hop``'s blocks on servers none of ``exclude``; None when nobody else holds them."""
        span = (hop.hop.start, hop.hop.end)
        session = self.session
        needs = SessionNeeds(session.batch_size, session.max_length)
        if session.planner.try_route(*span, needs, frozenset(exclude)) is None:
            if span not in self._unverifiable:
                self._unverifiable.add(span)
                logger.info(
                    "session=%s: blocks %d:%d have no other usable holder; not verified for now",
                    session.short_id,
                    *span,
                )
            return None
        self._unverifiable.discard(span)
        left_out = frozenset(exclude) | not_drawn(session.planner, span, needs, frozenset(exclude), self._rng)
        try:
            witness = _Witness(session.sub_session(span, left_out))
        except ShardnetError as error:
            logger.info("session=%s: no witness for blocks %d:%d: %s", session.short_id, *span, error)
            return None
        if witness.peers & exclude:  # the others vanished meanwhile and routing fell back on them
            witness.session.close()
            return None
        return witness

    def _outputs_of(self, hop: SessionHop, begin: int, end: int) -> torch.Tensor:
        """What ``hop`` answered for positions begin:end: the next hop's inputs, or the session's output."""
        hops = self.session.hops
        index = hops.index(hop)
        source = hops[index + 1].inputs if index + 1 < len(hops) else self._outputs
        return source.view()[:, begin:end]

    def _drop_gone(self) -> None:
        for hop in list(self._witnesses):
            if hop not in self.session.hops:  # failed over: the replacement gets its own witness
                self._close(hop)

    def _close(self, hop: SessionHop) -> None:
        witness = self._witnesses.pop(hop, None)
        if witness is not None:
            witness.session.close()

    # ---- what generation does between steps ----

    def reorder(self, rows: torch.Tensor) -> None:
        self._outputs.reorder(rows)
        for witness in self._witnesses.values():
            witness.session.reorder(rows)

    def crop(self, keep: int) -> None:
        self._outputs.truncate(keep)
        for witness in self._witnesses.values():
            if witness.session.position > keep:
                witness.session.crop(keep)

    def close(self) -> None:
        for hop in list(self._witnesses):
            self._close(hop)


def _names(peers: frozenset[str]) -> str:
    return "+".join(sorted(".." + peer[-6:] for peer in peers))
