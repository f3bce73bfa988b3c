"""ShardedModel: a causal LM whose blocks run on the swarm, with the Hugging Face API people know."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import hivemind
import torch
from transformers import GenerationConfig, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from shardnet.client import generation
from shardnet.client.config import ClientConfig, peer_set, quant_set
from shardnet.client.conversation import Conversation
from shardnet.client.forward import forward_through_swarm
from shardnet.client.health import ServerHealth
from shardnet.client.planner import RoutePlanner
from shardnet.client.routing import RouteHop
from shardnet.client.session import InferenceSession
from shardnet.client.swarm_view import SwarmView
from shardnet.client.transport import Transport
from shardnet.devices import HOST, make_current, resolve_device
from shardnet.errors import ConfigError, GenerationError
from shardnet.models import Checkpoint, ClientHead, adapter_for, load_config

logger = logging.getLogger(__name__)


class ShardedModel:
    """Embeddings, final norm and LM head locally; every transformer block on the swarm.

    ``model(input_ids, attention_mask=...)`` returns ``.logits`` like a transformers causal LM;
    ``model.generate(...)`` takes transformers' generation kwargs; ``model.inference_session(max_length)``
    keeps the servers' KV caches across calls. One model may be used from many threads at once: each
    call outside ``inference_session`` runs in a session of its own, and an ``inference_session``
    belongs to the thread (or asyncio task) that opened it.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        generation_config: GenerationConfig,
        head: ClientHead,
        swarm: SwarmView,
        transport: Transport,
        client_config: ClientConfig,
    ):
        self.config = config
        self.generation_config = generation_config
        self.head = head
        self.swarm = swarm
        self.transport = transport
        self.client_config = client_config
        self.health = swarm.health
        self.planner = RoutePlanner(swarm, self.health, client_config)
        self._conversation: contextvars.ContextVar[Conversation | None] = contextvars.ContextVar(
            f"shardnet_conversation_{id(self)}", default=None
        )
        self._last_route: contextvars.ContextVar[tuple[RouteHop, ...]] = contextvars.ContextVar(
            f"shardnet_last_route_{id(self)}", default=()
        )

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        initial_peers: Sequence[str] = (),
        *,
        model_id: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        dht: hivemind.DHT | None = None,
        allowed_servers: Iterable[str] | None = None,
        blocked_servers: Iterable[str] | None = None,
        quant: str | Iterable[str] = "none",
        route_timeout_s: float = 30.0,
        request_timeout_s: float = 120.0,
        max_retries: int = 3,
        refresh_interval_s: float = 10.0,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> ShardedModel:
        """Load the client-side weights from a local model folder and join the swarm.

        ``dtype`` is the dtype of the local parts and of the activations sent; only servers computing in
        the same dtype are used. ``device``: where the local parts (embeddings, LM head) compute: "cpu"
        (the default), "cuda", "cuda:N", "mps" or "auto"; servers use their own devices either way, and
        activations cross the wire on the host. ``allowed_servers`` / ``blocked_servers``: peer ids (base58) to use
        exclusively / never. ``quant``: quantizations of servers to route through: "none" (exact
        weights, the default), "int8", "nf4", several of them, or "any". ``route_timeout_s``: how long to wait for usable servers covering the blocks.
        ``request_timeout_s``: a server that does not answer one step (or forward) in time counts as
        failed, and the session fails over. ``max_retries``: failovers allowed per step.
        """
        client_config = ClientConfig(
            dtype=dtype,
            device=str(device),
            route_timeout_s=route_timeout_s,
            request_timeout_s=request_timeout_s,
            max_retries=max_retries,
            refresh_interval_s=refresh_interval_s,
            max_message_bytes=max_message_bytes,
            allowed_servers=peer_set(allowed_servers, "allowed_servers"),
            blocked_servers=peer_set(blocked_servers, "blocked_servers") or frozenset(),
            quant=quant_set(quant),
        )
        if not initial_peers and dht is None:
            raise ConfigError("initial_peers is empty: pass the multiaddrs printed by `shardnet dht`")
        config = load_config(model_path)
        where = resolve_device(client_config.device, flag="device")  # ConfigError if this machine lacks it
        make_current(where)
        head = adapter_for(config).load_head(Checkpoint(model_path), config, dtype, where)
        try:
            generation_config = GenerationConfig.from_pretrained(model_path, local_files_only=True)
        except OSError:
            generation_config = GenerationConfig.from_model_config(config)
        # The DHT first: hivemind forks its process, which must happen before gRPC channels exist.
        transport = Transport(max_message_bytes)  # no channel exists before the first call
        swarm = SwarmView.connect(
            model_path,
            initial_peers,
            model_id=model_id,
            dht=dht,
            health=ServerHealth.shared(),
            transport=transport,
            refresh_interval_s=refresh_interval_s,
        )
        return cls(config, generation_config, head, swarm, transport, client_config)

    @property
    def last_route(self) -> list[RouteHop]:
        """The route of this thread's (or asyncio task's) most recent call or session."""
        return list(self._last_route.get())

    @last_route.setter
    def last_route(self, route: list[RouteHop]) -> None:
        self._last_route.set(tuple(route))

    @property
    def model_id(self) -> str:
        return self.swarm.model_id

    @property
    def num_blocks(self) -> int:
        return self.swarm.num_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.client_config.dtype

    @property
    def device(self) -> torch.device:
        """Where the local parts compute and where ``forward`` returns logits."""
        return self.head.device

    # ---- routing and sessions ----

    def route(self, refresh: bool = False) -> list[RouteHop]:
        """The chain a new session would use now (each session picks its own, near-best at random)."""
        if refresh:
            self.swarm.refresh()
        return self.planner.route(0, self.num_blocks)

    def _open_chain(self, batch_size: int, max_length: int) -> InferenceSession:
        session = InferenceSession(
            self.planner,
            self.transport,
            self.health,
            self.model_id,
            (0, self.num_blocks),
            batch_size,
            max_length,
            self.client_config,
        )
        self.last_route = session.route
        return session

    @contextlib.contextmanager
    def inference_session(self, max_length: int) -> Iterator[Conversation]:
        """Keep the servers' KV caches across generate()/forward() calls inside the ``with`` block.

        The session belongs to the thread (or asyncio task) that opened it; calls from other threads
        run in sessions of their own. ``session.route`` tells the servers it runs on.
        """
        if self._conversation.get() is not None:
            raise GenerationError("an inference session is already open on this model in this thread")
        if max_length < 1:
            raise GenerationError("max_length must be at least 1")
        conversation = Conversation(self._open_chain, self.head, max_length, self.dtype)
        token = self._conversation.set(conversation)
        try:
            yield conversation
        finally:
            self._conversation.reset(token)
            conversation.close()

    # ---- forward ----

    def __call__(self, *args, **kwargs) -> CausalLMOutputWithPast:
        return self.forward(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **unused,
    ) -> CausalLMOutputWithPast:
        """Logits [batch, seq, vocab]. Inside an inference session the tokens extend the session."""
        if unused:
            raise GenerationError(f"forward() got unsupported arguments: {', '.join(sorted(unused))}")
        input_ids = _as_ids(input_ids)
        attention_mask = None if attention_mask is None else attention_mask.to(HOST)
        position_ids = None if position_ids is None else position_ids.to(HOST)
        conversation = self._conversation.get()
        if conversation is not None:
            conversation.check_room(input_ids.shape[0], input_ids.shape[1])
            conversation.append(input_ids, attention_mask)
            logits = conversation.flush(last_only=False)
            self.last_route = conversation.route
            return CausalLMOutputWithPast(logits=logits)
        if position_ids is None:  # as transformers' forward without a cache: 0 .. seq-1, padding or not
            position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand(input_ids.shape[0], -1)
        hidden = self.head.embed(input_ids, position_ids).to(self.dtype)  # [batch, seq, hidden]
        hidden, self.last_route = forward_through_swarm(
            self.planner,
            self.transport,
            self.health,
            self.client_config,
            self.model_id,
            self.num_blocks,
            hidden,
            attention_mask,
            position_ids,
        )
        return CausalLMOutputWithPast(logits=self.head.logits(hidden))

    # ---- generate ----

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        streamer=None,
        generation_config: GenerationConfig | None = None,
        inputs: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Like transformers' generate (greedy or sampling): returns ``input_ids`` followed by new tokens.

        Inside ``inference_session`` a call continues the conversation: ``input_ids`` are the new tokens only.
        Tokens are chosen on the host; the result comes back on the device ``input_ids`` came on.
        """
        given = input_ids if input_ids is not None else inputs
        device = given.device if isinstance(given, torch.Tensor) else HOST
        input_ids = _as_ids(given)
        attention_mask = None if attention_mask is None else attention_mask.to(HOST)
        config = generation.resolve_config(self.generation_config, generation_config, kwargs)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise GenerationError(
                f"attention_mask shape {list(attention_mask.shape)} != input_ids shape {list(input_ids.shape)}"
            )
        conversation = self._conversation.get()
        if conversation is not None:
            budget = generation.new_token_budget(config, conversation.ids.shape[1] + input_ids.shape[1])
            conversation.check_room(input_ids.shape[0], input_ids.shape[1] + budget)
            out = generation.generate(conversation, input_ids, attention_mask, config, streamer)
            self.last_route = conversation.route
            return out.to(device)
        budget = generation.new_token_budget(config, input_ids.shape[1])
        with self.inference_session(max_length=input_ids.shape[1] + max(budget, 1)) as conversation:
            out = generation.generate(conversation, input_ids, attention_mask, config, streamer)
            self.last_route = conversation.route
            return out.to(device)

    # ---- lifetime ----

    def close(self) -> None:
        conversation = self._conversation.get()
        if conversation is not None:
            conversation.close()
        self.swarm.close()
        self.transport.close()

    def __enter__(self) -> ShardedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_ids(input_ids) -> torch.Tensor:
    if input_ids is None:
        raise GenerationError("input_ids is required")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise GenerationError(
            f"input_ids must be [batch, seq] integer token ids, got {list(input_ids.shape)} {input_ids.dtype}"
        )
    return input_ids.to(HOST, torch.long)  # token bookkeeping and the wire live on the host
