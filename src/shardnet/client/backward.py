"""Backward through remote blocks: ``loss.backward()`` on a ``ShardedModel``'s output computes gradients
through every hop of the swarm.

``RemoteBlocks`` is a ``torch.autograd.Function``. Its forward is a stateless forward through the swarm
(``client/forward.py``) that keeps each hop's input. Its backward walks the hops in reverse: each server
runs its span's forward again with autograd and returns the gradient with respect to the hop's input
(the ``Backward`` rpc; ``server/training.py``), which becomes the gradient with respect to the previous
hop's output. Servers keep nothing between calls and never change their weights, so everything that
trains lives on the client: the head's parameters, prompts, the inputs' embeddings.

A server that fails its backward is replaced as a forward's would be (``client/failover.py``): its
blocks are routed again, possibly over several servers with other boundaries; the forward runs again
over the replacements to get each one's input, then the backward runs through them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import torch

from shardnet.client.config import ClientConfig
from shardnet.client.failover import Failover
from shardnet.client.forward import forward_through_swarm, hop_prompts
from shardnet.client.hop_stream import optional_tensors
from shardnet.client.planner import RoutePlanner
from shardnet.client.routing import RouteHop, describe
from shardnet.client.transport import Transport
from shardnet.client.trust import ServerTrust
from shardnet.errors import InvalidRequestError, ShardnetError
from shardnet.wire import pb
from shardnet.wire.status import error_from_rpc
from shardnet.wire.tensors import deserialize, serialize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwarmBlocks:
    """The swarm's blocks as a client sees them, for forwards that may be differentiated."""

    planner: RoutePlanner
    transport: Transport
    health: ServerTrust
    config: ClientConfig
    model_id: str
    num_blocks: int

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        start: int = 0,
        hop_inputs: list[torch.Tensor] | None = None,
        prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[RouteHop]]:
        return forward_through_swarm(
            self.planner,
            self.transport,
            self.health,
            self.config,
            self.model_id,
            self.num_blocks,
            hidden,
            mask,
            positions,
            start=start,
            hop_inputs=hop_inputs,
            prompts=prompts,
        )

    def backward(
        self,
        hops: list[RouteHop],
        hop_inputs: list[torch.Tensor],
        grad: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gradients with respect to the first hop's input and to the deep ``prompts`` (or None),
        given the gradient with respect to the last hop's output."""
        extra = optional_tensors(mask, positions, self.transport.max_message_bytes)
        if self.config.active_adapter:
            extra["adapter"] = self.config.active_adapter
        failover = Failover(self.config, self.health, "backward")
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)  # [blocks, pre, hidden]
        for hop, given in zip(reversed(hops), reversed(hop_inputs), strict=True):
            grad = self._through(
                hop.start, hop.end, [hop], given, grad, extra, prompts, grad_prompts, failover
            )
        return grad, grad_prompts

    def _through(
        self,
        start: int,
        end: int,
        route: list[RouteHop],
        given: torch.Tensor,
        grad: torch.Tensor,
        extra: dict,
        prompts: torch.Tensor | None,
        grad_prompts: torch.Tensor | None,
        failover: Failover,
    ) -> torch.Tensor:
        """Back through blocks start:end over ``route`` (whose first hop takes ``given``), failing over;
        adds the hops' prompt gradients into ``grad_prompts``."""
        while True:
            try:
                inputs = [given]
                for hop in route[:-1]:  # a replacement route's inner hops: their inputs, forward again
                    budget = failover.budget_s(hop, given.shape[0] * given.shape[1])
                    inputs.append(self._call(hop, inputs[-1], None, extra, prompts, budget)[0])
                hop_grads = []
                for hop, hop_input in zip(reversed(route), reversed(inputs), strict=True):
                    budget = 2 * failover.budget_s(hop, given.shape[0] * given.shape[1])
                    grad, hop_grad_prompts = self._call(hop, hop_input, grad, extra, prompts, budget)
                    hop_grads.append((hop, hop_grad_prompts))
                if grad_prompts is not None:  # only once the whole span went through
                    for hop, hop_grad_prompts in hop_grads:
                        grad_prompts[hop.start : hop.end] += hop_grad_prompts.to(grad_prompts.dtype)
                return grad
            except _HopFailed as failed:
                failover.failed(failed.hop, failed.error, opening=True)  # raises when no retry is left
                route = self.planner.route(start, end, exclude=failover.excluded)
                logger.info(
                    "backward: %s failed (%s); rerouted to %s", failed.hop, failed.error, describe(route)
                )

    def _call(
        self,
        hop: RouteHop,
        hidden: torch.Tensor,
        grad: torch.Tensor | None,
        extra: dict,
        prompts: torch.Tensor | None,
        timeout_s: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A Forward (``grad`` None: the output) or a Backward (the input's and prompts' gradients)."""
        limit = self.transport.max_message_bytes
        common = dict(
            model_id=self.model_id,
            span=pb.Span(start=hop.start, end=hop.end),
            hidden_states=serialize(hidden, limit),
            **extra,
            **hop_prompts(hop, prompts, limit),
        )
        stub = self.transport.stub(hop.server.address, hop.server.record.tls_fingerprint)
        try:
            if grad is None:
                reply = stub.Forward(pb.ForwardRequest(**common), timeout=timeout_s)
                return deserialize(reply.hidden_states), None
            request = pb.BackwardRequest(grad_outputs=serialize(grad.contiguous(), limit), **common)
            reply = stub.Backward(request, timeout=timeout_s)
            grad_prompts = deserialize(reply.grad_prompts) if reply.HasField("grad_prompts") else None
            if prompts is not None and grad_prompts is None:
                raise InvalidRequestError(f"{hop} returned no gradient for the deep prompts it was given")
            return deserialize(reply.grad_inputs), grad_prompts
        except grpc.RpcError as exc:
            raise _HopFailed(
                hop, error_from_rpc(exc, f"{hop.server.short_id}@{hop.server.address}")
            ) from None
        except ShardnetError as error:
            raise _HopFailed(hop, error) from None


class _HopFailed(Exception):
    def __init__(self, hop: RouteHop, error: ShardnetError):
        super().__init__(str(error))
        self.hop = hop
        self.error = error


class RemoteBlocks(torch.autograd.Function):
    """(hidden [batch, seq, hidden], deep prompts [blocks, pre, hidden] or None) -> the swarm's output,
    differentiable with respect to both."""

    @staticmethod
    def forward(ctx, hidden, prompts, blocks: SwarmBlocks, mask, positions, route_out: list):
        hop_inputs: list[torch.Tensor] = []
        given_prompts = None if prompts is None else prompts.detach()
        out, hops = blocks.forward(
            hidden.detach(), mask, positions, hop_inputs=hop_inputs, prompts=given_prompts
        )
        ctx.blocks, ctx.hops, ctx.hop_inputs, ctx.prompts = blocks, hops, hop_inputs, given_prompts
        ctx.mask, ctx.positions = mask, positions
        route_out.extend(hops)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad, grad_prompts = ctx.blocks.backward(
            ctx.hops, ctx.hop_inputs, grad_out, ctx.mask, ctx.positions, ctx.prompts
        )
        if grad_prompts is not None:
            grad_prompts = grad_prompts.to(ctx.prompts.dtype)
        return grad.to(grad_out.dtype), grad_prompts, None, None, None, None
