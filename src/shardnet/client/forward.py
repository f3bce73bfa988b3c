"""A stateless forward through the swarm (the unary Forward RPC, no cache), re-routed around failures.

Nothing is kept on the servers, so a failed or late hop is simply run again elsewhere: the blocks from
the failed hop to the end are routed again and the hidden states that entered it are sent there. What is
retried, charged and banned, and how long a hop may take, is ``client/failover.py``'s to decide. With
``verify_fraction``, a sampled fraction of the hops are run again by other holders of their blocks
(``client/verification.py``: ``check_forward``).
"""

from __future__ import annotations

import logging
import random

import grpc
import torch

from shardnet.client.config import ClientConfig
from shardnet.client.failover import Failover
from shardnet.client.hop_stream import optional_tensors
from shardnet.client.planner import RoutePlanner
from shardnet.client.routing import RouteHop, describe
from shardnet.client.transport import Transport
from shardnet.client.trust import ServerTrust
from shardnet.client.verification import check_forward, tolerance
from shardnet.errors import ShardnetError
from shardnet.wire import pb
from shardnet.wire.status import error_from_rpc
from shardnet.wire.tensors import deserialize, serialize

logger = logging.getLogger(__name__)


def _forward_hop(
    transport: Transport,
    hop: RouteHop,
    model_id: str,
    hidden: torch.Tensor,
    extra: dict,
    timeout_s: float,
    prompts: torch.Tensor | None = None,
) -> torch.Tensor:
    request = pb.ForwardRequest(
        model_id=model_id,
        span=pb.Span(start=hop.start, end=hop.end),
        hidden_states=serialize(hidden, transport.max_message_bytes),
        **extra,
        **hop_prompts(hop, prompts, transport.max_message_bytes),
    )
    try:
        reply = transport.stub(hop.server.address, hop.server.record.tls_fingerprint).Forward(
            request, timeout=timeout_s
        )
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, f"{hop.server.short_id}@{hop.server.address}") from None
    return deserialize(reply.hidden_states)


def hop_prompts(hop: RouteHop, prompts: torch.Tensor | None, limit: int) -> dict:
    """The ``prompts`` field of a hop's request: its blocks' share of deep prompts [blocks, pre, hidden]."""
    if prompts is None:
        return {}
    return {"prompts": serialize(prompts[hop.start : hop.end].contiguous(), limit)}


def forward_through_swarm(
    planner: RoutePlanner,
    transport: Transport,
    health: ServerTrust,
    config: ClientConfig,
    model_id: str,
    num_blocks: int,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    start: int = 0,
    hop_inputs: list[torch.Tensor] | None = None,
    prompts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[RouteHop]]:
    """Run full sequences [batch, seq, hidden] through blocks ``start:num_blocks``; returns the output and
    the hops used. ``hop_inputs``: if given, each used hop's input is appended to it (for backward).
    ``prompts``: deep prompt tuning's, [num_blocks, pre, hidden] (``client/prompt_tuning.py``)."""
    extra = optional_tensors(mask, positions, transport.max_message_bytes)
    if config.active_adapter:
        extra["adapter"] = config.active_adapter
    failover = Failover(config, health, "forward")
    tol = tolerance(config.dtype)

    def run(hops: list[RouteHop], given: torch.Tensor) -> torch.Tensor:  # a witness's route, no failover
        for witness_hop in hops:
            budget = failover.budget_s(witness_hop, given.shape[0] * given.shape[1])
            given = _forward_hop(transport, witness_hop, model_id, given, extra, budget, prompts)
        return given

    route = planner.route(start, num_blocks)
    used: list[RouteHop] = []
    inputs: list[torch.Tensor] = []
    index = 0
    while index < len(route):
        hop = route[index]
        budget = failover.budget_s(hop, hidden.shape[0] * hidden.shape[1])
        try:
            given = hidden
            hidden = _forward_hop(transport, hop, model_id, given, extra, budget, prompts)
            if config.verify_fraction and random.random() < config.verify_fraction:
                hidden = check_forward(hop, given, hidden, mask, planner, run, tol)
        except ShardnetError as error:
            failover.failed(hop, error, opening=True)  # nothing is kept there: every hop starts afresh
            route = planner.route(hop.start, num_blocks, exclude=failover.excluded)
            logger.info("forward: %s failed (%s); rerouted to %s", hop, error, describe(route))
            index = 0
            continue
        used.append(hop)
        inputs.append(given)
        index += 1
    if hop_inputs is not None:
        hop_inputs.extend(inputs)
    return hidden, used
