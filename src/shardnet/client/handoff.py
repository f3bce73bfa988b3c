"""The client's side of a KV hand-off: a draining server answered a step with ``StepResult.moved``
(see ``server/handoff.py``); the session's stream to that hop is opened again at the new holder with the
adoption token, with the old stream's position and pending reorder, and the step is sent there. Nothing is
replayed. When that fails (the holder is gone, the token expired), the caller falls back to replay.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shardnet.client.failover import Failover
from shardnet.client.hop_stream import SpanStream
from shardnet.client.routing import RouteHop
from shardnet.dht import ServerView
from shardnet.errors import ShardnetError
from shardnet.wire import pb

if TYPE_CHECKING:
    from shardnet.client.session import InferenceSession
    from shardnet.client.session_hops import SessionHop

logger = logging.getLogger(__name__)


def adopt_stream(
    session: InferenceSession, hop: SessionHop, moved: pb.Moved, failover: Failover
) -> SpanStream | None:
    """A stream to the server that adopted ``hop``'s session, in the state ``hop``'s stream was in."""
    view = _announced(session, moved.peer_id, moved.address)
    if view is None:
        logger.info(
            "session=%s: %s is not in the swarm view; replaying instead", session.short_id, moved.address
        )
        return None
    route_hop = RouteHop(view, hop.hop.start, hop.hop.end)
    try:
        stream = session.open_stream(
            route_hop, failover.budget_s(route_hop, 0), adopt_token=moved.adopt_token
        )
    except ShardnetError as error:
        logger.info(
            "session=%s: adopting at %s failed (%s); replaying instead",
            session.short_id,
            moved.address,
            error,
        )
        return None
    stream.position, stream.pending_rows = hop.stream.position, hop.stream.pending_rows
    return stream


def _announced(session: InferenceSession, peer_id: str, address: str) -> ServerView | None:
    """The swarm view's entry for the server ``peer_id`` at ``address`` (looked up again once)."""
    for attempt in range(2):
        for view in session.view.snapshot().servers:
            if view.record.peer_id == peer_id and view.address == address:
                return view
        if attempt == 0:
            session.refresh_view(max_age_s=0.0)
    return None
