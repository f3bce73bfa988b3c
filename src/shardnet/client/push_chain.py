"""PushedStep: one step through a chain of hops whose servers push it on, server to server.

The client sends the step to the chain's first server with the rest of the chain (``pb.NextHop``); each
server computes, pushes its output to the next, waits for that push to be acknowledged, and answers the
client with its output and whether the push went through. The last server's answer is the step's output.
The client listens to every stream of the chain at once (``ReplyBoard``) and acts on what it hears:

- a server answers with ``push_error`` (the link to the next one is broken, or the next one froze): the
  client delivers the step to the next server itself, and avoids pushing over that link a while; nobody
  is banned for a link (``Failover.broken_link``);
- a server fails, or the first server still owing an answer runs past its budget (frozen): the failover
  policy charges it, a replacement is opened and replayed with the step at the end (a hedge when late),
  and the step goes on from the replacement's output;
- the last server answers: the step is done. Answers of servers before it that are still to come are
  read when the session is next used (``collect``), into the replay history.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from shardnet.client.failover import Failover
from shardnet.client.hop_stream import NotPushedError, SessionMovedError, SpanStream
from shardnet.client.timings import ChainClock
from shardnet.errors import SessionExpiredError, ShardnetError, StepTimeoutError

if TYPE_CHECKING:
    from shardnet.client.session import InferenceSession
    from shardnet.client.session_hops import SessionHop

logger = logging.getLogger(__name__)


class PushedStep:
    def __init__(
        self,
        session: InferenceSession,
        hops: list[SessionHop],
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        failover: Failover,
    ):
        self._session = session
        self.hops = hops  # the chain, as it was when the step began
        self._mask = mask  # [batch, new] or None, as the step was given
        self._positions = positions  # [batch, new]
        self._failover = failover
        self.new = hidden.shape[1]
        self.began = time.perf_counter()
        count = len(hops)
        self.inputs: list[torch.Tensor | None] = [hidden] + [None] * (count - 1)  # each hop's input
        self.settled = [False] * count  # the hop's output is known (its answer, or a replacement's)
        self.replaced = [False] * count  # the hop's replacements hold this step already
        self.recorded = [False] * count  # this step's input is in the hop's replay history
        self.failed: list[ShardnetError | None] = [None] * count  # a failure not acted on yet
        self.undelivered = [False] * count  # the hop awaits the step but nobody pushed it
        self.timings = [hop.stream.new_timing() for hop in hops]  # filled in place as answers are read
        self.clock = ChainClock(
            self.timings, self.began, [hop.stream.clock for hop in hops], session.health.rtt
        )
        self._outputs: list[torch.Tensor | None] = [None] * count
        self._since: dict[int, float] = {}  # hop -> when the chain started waiting on it
        streams = self.streams
        self.route = [stream.await_push() for stream in streams[1:]]  # told before the push can reach them
        first = streams[0].build_step(hidden, mask, positions, push=self.route)
        self.clock.sent(0, time.perf_counter())
        streams[0].send(first)
        self.step_ids = [first.step_id, *(entry.step_id for entry in self.route)]

    @property
    def streams(self) -> list[SpanStream]:
        return [hop.stream for hop in self.hops]

    def run(self) -> torch.Tensor:
        """Wait for the chain's output [batch, new, hidden], failing over and delivering as needed."""
        while not self.settled[-1]:
            self._advance(self.settled.index(False))
        self._record()
        return self.output

    def collect(self) -> None:
        """Read every answer still owed (after the step's output came), so each hop's replay history
        holds this step; a hop whose answer never comes is replaced, as during the step."""
        while not all(self.settled):
            self._advance(self.settled.index(False))
        self._record()

    def read_late_answers(self, deadline: float) -> None:
        """When the session closes: read the owed answers already come (or coming by ``deadline``,
        ``time.monotonic()``) for their hops' timings only; nothing is replaced, delivered or recorded."""
        while not all(self.settled):
            listening = [self.streams[j] for j in range(len(self.hops)) if not self.settled[j]]
            posted = self._session.board.wait(listening, deadline)
            if posted is None:
                return
            index = self.streams.index(posted.stream)
            stream = self.streams[index]
            try:
                result = stream.step_result(stream.reply_of(posted.item), self.step_ids[index])
            except ShardnetError:
                self.settled[index] = True  # nothing to time; the session is closing anyway
                continue
            if result is not None:
                self.settled[index] = True
                self.clock.answered(index, result, posted.arrived, time.perf_counter())

    @property
    def output(self) -> torch.Tensor:
        return self._outputs[-1]

    def _advance(self, frontier: int) -> None:
        """One event, ``frontier`` being the first hop still owing its output (every hop before it has
        one, so its input is known): act on its failure, or on the next answer heard, or hedge it when it
        runs past its budget."""
        if self.failed[frontier] is not None:
            self._fail_over(frontier, self.failed[frontier])
            return
        hop = self.hops[frontier]
        budget = self._failover.budget_s(hop.hop, self.new, hop.stream.recent_s)
        since = self._since.get(frontier)
        if since is None:
            since = self._since[frontier] = time.monotonic()
        listening = [self.streams[j] for j in range(len(self.hops)) if not self.settled[j]]
        posted = self._session.board.wait(listening, since + budget)
        if posted is None:
            self._fail_over(frontier, StepTimeoutError(f"{hop.stream.peer}: no answer within {budget:.1f}s"))
            return
        self._heard(self.streams.index(posted.stream), posted.item, posted.arrived)

    def _heard(self, index: int, item: object, arrived: float) -> None:
        stream = self.streams[index]
        try:
            result = stream.step_result(stream.reply_of(item), self.step_ids[index])
        except SessionMovedError as moved:
            self._moved(index, moved)
            return
        except NotPushedError:  # it gave up waiting for the push: it takes the step as a plain one
            self.undelivered[index] = True
            self._deliver_ready()
            return
        except ShardnetError as error:
            self.failed[index] = error
            return
        if result is None:  # a late answer to an earlier step
            return
        out = stream.accept(result, self.new)
        self.clock.answered(index, result, arrived, time.perf_counter())
        self._settle(index, out)
        if result.push_error and index + 1 < len(self.hops) and not self.settled[index + 1]:
            self._failover.broken_link(self.hops[index].hop, self.hops[index + 1].hop, result.push_error)
            self.undelivered[index + 1] = True
        self._deliver_ready()

    def _settle(self, index: int, out: torch.Tensor) -> None:
        self.settled[index] = True
        self._outputs[index] = out
        if index + 1 < len(self.hops):
            self.inputs[index + 1] = out

    def _deliver_ready(self) -> None:
        """Send the step to each hop that awaits it in vain, once the hop before it has its output."""
        for index in range(1, len(self.hops)):
            if self.undelivered[index] and self.settled[index - 1] and not self.settled[index]:
                self.undelivered[index] = False
                stream = self.streams[index]
                rest = self.route[index:]  # the hops after it, still awaiting their pushes
                step = stream.build_step(self.inputs[index], self._mask, self._positions, push=rest)
                self.step_ids[index] = step.step_id
                self._since.pop(index, None)  # its budget starts now
                self.clock.sent(index, time.perf_counter())
                try:
                    stream.send(step)
                except ShardnetError as error:
                    self.failed[index] = error
                    continue
                self._session.health.count("delivered")

    def _moved(self, index: int, moved: SessionMovedError) -> None:
        """Hop ``index``'s server drains and handed the session over: send the step to its new home."""
        adopted = self._session.adopt_hop(self.hops[index], moved.moved, self._failover)
        if adopted is None:
            self.failed[index] = SessionExpiredError(str(moved))
            return
        self.hops[index] = adopted
        self.clock.moved(index, adopted.stream.hop.peer_id, adopted.stream.clock)
        self._since.pop(index, None)
        if index > 0:
            self.undelivered[index] = True
            self._deliver_ready()
            return
        step = adopted.stream.build_step(self.inputs[0], self._mask, self._positions, push=self.route)
        self.step_ids[0] = step.step_id
        self.clock.sent(0, time.perf_counter())
        try:
            adopted.stream.send(step)
        except ShardnetError as error:
            self.failed[0] = error

    def _fail_over(self, index: int, error: ShardnetError) -> None:
        """Replace hop ``index`` (charged to the step's failover budget) and go on from its output."""
        self.failed[index] = None
        self._failover.failed(self.hops[index].hop, error)
        began = time.perf_counter()
        out = self._session.replace_hop(self.hops[index], self.inputs[index], self._failover)
        self.clock.failed_over(index, began, time.perf_counter())
        self.replaced[index] = True
        self._settle(index, out[:, -self.new :])
        if index + 1 < len(self.hops) and not self.settled[index + 1]:
            self.undelivered[index + 1] = True
        self._deliver_ready()

    def _record(self) -> None:
        """Put this step's input into the replay history of each hop that answered it, once known. A hop
        still owing its answer is not recorded yet: should it never come, its replay adds the step."""
        for index, hop in enumerate(self.hops):
            known = self.inputs[index] is not None  # the answer of the hop before it may come later
            if known and self.settled[index] and not self.recorded[index] and not self.replaced[index]:
                hop.inputs.append(self.inputs[index])
                self.recorded[index] = True
