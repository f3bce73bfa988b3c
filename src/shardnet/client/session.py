"""InferenceSession: a chain of SpanStreams over a route, which survives the servers it runs on.

Every hop keeps the hidden states that entered it (``GrowingBuffer``, bounded by max_length), and the
session keeps the positions and padding mask of every step. When a server fails a step (dies, runs past
its budget, refuses, drains, reclaims the session), only that hop's blocks are routed again, possibly
over several replacement servers with other boundaries; its inputs are replayed to rebuild their caches,
with the failed step's inputs at the end, and the step goes on from the next hop. The replacement
servers compute exactly what the failed one would have, so the tokens are the same as without the
failure. What is retried, charged, banned and hedged is ``client/failover.py``'s to decide; hops
whose servers push to each other run as one ``PushedStep`` (``client/push_chain.py``); opening, replaying
and replacing hops is ``client/session_hops.py``'s; checking a sampled fraction of the steps on other
servers is ``client/verification.py``'s.
"""

from __future__ import annotations

import logging
import time
import uuid

import torch

from shardnet.client.config import ClientConfig
from shardnet.client.failover import Failover
from shardnet.client.history import GrowingBuffer
from shardnet.client.hop_stream import SessionMovedError
from shardnet.client.planner import RoutePlanner, SessionNeeds
from shardnet.client.push_chain import PushedStep
from shardnet.client.replies import ReplyBoard
from shardnet.client.routing import RouteHop, describe
from shardnet.client.session_hops import HopReplacement, SessionHop
from shardnet.client.timings import HopTiming, StepTiming
from shardnet.client.transport import Transport
from shardnet.client.trust import ServerTrust
from shardnet.client.verification import Verifier
from shardnet.devices import HOST
from shardnet.errors import GenerationError, SessionError, SessionExpiredError, ShardnetError

logger = logging.getLogger(__name__)
LATE_ANSWERS_WAIT_S = 0.5  # on close, how long to wait for answers still owed, for the last step's timings


class InferenceSession(HopReplacement):
    def __init__(
        self,
        planner: RoutePlanner,
        transport: Transport,
        health: ServerTrust,
        model_id: str,
        blocks: tuple[int, int],
        batch_size: int,
        max_length: int,
        config: ClientConfig,
        exclude: frozenset[str] = frozenset(),
        verify: bool = True,
    ):
        """``exclude``: servers never to use for this session (a witness's: the server it checks).
        ``verify``: check a sampled fraction of steps on other servers (``config.verify_fraction``)."""
        self.session_id = uuid.uuid4().hex
        self.model_id = model_id
        self.blocks = blocks  # half-open span of blocks the session runs, (0, num_blocks) for a model
        self.batch_size = batch_size
        self.max_length = max_length
        self.position = 0
        self.failovers = 0  # hops replaced so far (their history replayed)
        self.handoffs = 0  # hops whose draining server handed the session over (nothing replayed)
        self.last_timing = StepTiming()  # where the last step's time went, hop by hop
        self.health = health
        self.board = ReplyBoard()  # every stream's replies, as they come
        self._planner = planner
        self._transport = transport
        self._config = config
        self._exclude = exclude
        self._needs = SessionNeeds(batch_size, max_length)
        self._positions = GrowingBuffer(max_length)  # [batch, position] every position id sent
        self._mask = GrowingBuffer(max_length)  # [batch, position] 0/1 padding of every position
        self._masked = False  # whether a padding mask was ever sent (then replacements need it too)
        self._current: tuple[torch.Tensor | None, torch.Tensor] | None = (
            None  # the step running: mask, positions
        )
        self._hops: list[SessionHop] = []
        self._uncollected: list[PushedStep] = []  # chains of the last step that still owe answers
        self._broken: str | None = None  # why a step failed midway; the session takes no more steps
        self._hops, _ = self._open(*blocks, None, self._failover())
        self._verifier = Verifier(self, config.verify_fraction) if verify and config.verify_fraction else None
        logger.info(
            "session open session=%s route=%s max_length=%d batch=%d",
            self.short_id,
            describe(self.route),
            max_length,
            batch_size,
        )

    @property
    def short_id(self) -> str:
        return self.session_id[:8]

    @property
    def route(self) -> list[RouteHop]:
        """The servers this session runs on now (changes when it fails over)."""
        return [hop.hop for hop in self._hops]

    @property
    def hops(self) -> list[SessionHop]:
        return self._hops

    @property
    def config(self) -> ClientConfig:
        return self._config

    @property
    def planner(self) -> RoutePlanner:
        return self._planner

    def _failover(self) -> Failover:
        return Failover(
            self._config, self.health, f"session={self.short_id}", failed_peers=set(self._exclude)
        )

    # ---- stepping ----

    def step(self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Run [batch, new, hidden] through every hop; mask (or None) and positions cover the new positions."""
        hidden = hidden.to(HOST)  # the replay history lives in host memory, whatever device the head is on
        new = hidden.shape[1]
        if self.position + new > self.max_length:
            raise GenerationError(
                f"the session holds at most {self.max_length} positions; {self.position} + {new} do not fit"
            )
        step_mask = torch.ones(hidden.shape[:2], dtype=torch.long) if mask is None else mask.to(torch.long)
        masked = self._masked or mask is not None
        if self._broken is not None:
            raise SessionError(
                f"session {self.short_id} lost its state when a step failed ({self._broken}); "
                "open a new inference session"
            )
        failover = self._failover()
        timings: list[HopTiming] = []
        try:
            self.collect()  # the last step's owed answers, replayed (if need be) as that step: no _current yet
            began = time.perf_counter()
            self._current = (step_mask if masked else None, positions)
            index = 0
            while index < len(self._hops):
                end = self._chain_end(index)
                after = self._hops[end] if end < len(self._hops) else None
                if end - index > 1:
                    chain = PushedStep(self, self._hops[index:end], hidden, mask, positions, failover)
                    hidden = chain.run()
                    timings.extend(chain.timings)
                    if not all(chain.settled):
                        self._uncollected.append(chain)  # a step may run as several chains
                else:
                    hidden = self._step_hop(self._hops[index], hidden, mask, positions, failover, timings)
                index = self._hops.index(after) if after is not None else len(self._hops)
            through_s = time.perf_counter() - began  # the output in hand; the bookkeeping below is not timed
        except BaseException as error:
            if any(len(h.inputs) != self.position or h.stream.position != self.position for h in self._hops):
                self._broken = f"{type(error).__name__}: {error}"  # some hops hold this step, some do not
            raise
        finally:
            self._current = None
        self._positions.append(positions.to(torch.long))
        self._mask.append(step_mask)
        self._masked = masked
        self.position += new
        self.last_timing = StepTiming(through_s, new, timings)
        if self._verifier is not None:
            try:
                hidden = self._verifier.after_step(hidden)
            except BaseException as error:
                self._broken = f"{type(error).__name__}: {error}"  # a repair may have stopped midway
                raise
        return hidden

    def _step_hop(
        self,
        hop: SessionHop,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        failover: Failover,
        timings: list[HopTiming],
    ) -> torch.Tensor:
        """One hop's step, sent by the client and answered to it; replaced when it fails or is late."""
        new = hidden.shape[1]
        began = time.perf_counter()  # a failure's wait counts in the hop's failover time
        try:
            while True:
                budget = failover.budget_s(hop.hop, new, hop.stream.recent_s)
                try:
                    out, timing = hop.stream.step(hidden, mask, positions, budget)
                    break
                except SessionMovedError as moved:
                    adopted = self.adopt_hop(hop, moved.moved, failover)
                    if adopted is None:
                        raise SessionExpiredError(str(moved)) from None
                    hop = adopted
        except ShardnetError as error:
            failover.failed(hop.hop, error)
            replaced = len(self._hops)
            out = self.replace_hop(hop, hidden, failover)[:, -new:]
            timing = hop.stream.new_timing()
            timing.failed_over, timing.pending, timing.failover_s = True, False, time.perf_counter() - began
            timings.append(timing)  # the replacement's other hops, if several, are counted in it
            timings.extend(
                HopTiming(failed_over=True, pending=False) for _ in range(len(self._hops) - replaced)
            )
            return out
        hop.inputs.append(hidden)
        timings.append(timing)
        return out

    def _chain_end(self, index: int) -> int:
        """One past the last hop that the step, entering at hop ``index``, reaches by pushes: servers that
        take pushes, over links not known to be broken."""
        end = index + 1
        if not self._config.push:
            return end
        while end < len(self._hops):
            before, after = self._hops[end - 1], self._hops[end]
            if not (before.stream.push_token and after.stream.push_token):
                break
            if self.health.link_broken(before.hop.peer_id, after.hop.peer_id):
                break
            end += 1
        return end

    @property
    def pushing(self) -> bool:
        """Whether steps go server to server: asked for, and every server of the route takes pushes."""
        return self._config.push and len(self._hops) > 1 and all(h.stream.push_token for h in self._hops)

    def sub_session(self, blocks: tuple[int, int], exclude: frozenset[str]) -> InferenceSession:
        """A session of the same shape over ``blocks`` on servers none of ``exclude`` (a witness), itself
        unverified."""
        return InferenceSession(
            self._planner,
            self._transport,
            self.health,
            self.model_id,
            blocks,
            self.batch_size,
            self.max_length,
            self._config,
            exclude=exclude,
            verify=False,
        )

    def mask_history(self, begin: int, end: int) -> torch.Tensor | None:
        """The padding mask of positions begin:end [batch, end - begin], None when none was ever sent."""
        return self._mask.view()[:, begin:end] if self._masked else None

    def position_history(self, begin: int, end: int) -> torch.Tensor:
        """The position ids of positions begin:end, [batch, end - begin]."""
        return self._positions.view()[:, begin:end]

    @property
    def view(self):
        """The swarm view routes come from."""
        return self._planner.view

    def collect(self) -> None:
        """Read the answers the last pushed step still owes, into the replay history (see PushedStep)."""
        pending, self._uncollected = self._uncollected, []
        for chain in pending:
            chain.collect()

    # ---- what generation does between steps: beam reorders, rollbacks ----

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of every cache (the servers', the replay history) becomes old row ``rows[i]``.

        Every server applies it with the session's next step; the replay history is reordered now, so a
        replacement server rebuilds the reordered cache."""
        self.collect()
        rows = rows.to(HOST, torch.long)
        if list(rows.shape) != [self.batch_size] or int(rows.min()) < 0 or int(rows.max()) >= self.batch_size:
            raise GenerationError(
                f"reorder rows must be {self.batch_size} indices in 0..{self.batch_size - 1}"
            )
        for hop in self._hops:
            hop.stream.reorder(rows)
            hop.inputs.reorder(rows)
        self._positions.reorder(rows)
        self._mask.reorder(rows)
        if self._verifier is not None:
            self._verifier.reorder(rows)

    def crop(self, keep: int) -> None:
        """Forget every position from ``keep`` on, in the servers' caches (with the next step) and here."""
        if not 0 <= keep <= self.position:
            raise GenerationError(f"cannot keep {keep} positions of a session holding {self.position}")
        self.collect()
        for hop in self._hops:
            hop.stream.crop(keep)
            hop.inputs.truncate(keep)
        self._positions.truncate(keep)
        self._mask.truncate(keep)
        self.position = keep
        if self._verifier is not None:
            self._verifier.crop(keep)

    # ---- lifetime ----

    def close(self) -> None:
        deadline = time.monotonic() + LATE_ANSWERS_WAIT_S
        for chain in self._uncollected:  # the last step's timings: the answers of earlier hops of its chains
            chain.read_late_answers(deadline)
        self._uncollected.clear()
        if self._verifier is not None:
            self._verifier.close()
        for hop in self._hops:
            hop.stream.close()
            self.health.session_closed(hop.hop.peer_id)
        self._hops.clear()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
