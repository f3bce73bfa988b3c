"""``shardnet api``: an OpenAI-compatible HTTP gateway over a ``ShardedModel``, with a chat page and a swarm page."""

from shardnet.gateway.app import create_app
from shardnet.gateway.serving import GatewayServer, open_gateway

__all__ = ["GatewayServer", "create_app", "open_gateway"]
