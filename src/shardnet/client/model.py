"""ShardedModel: a causal LM whose blocks run on the swarm, with the Hugging Face API people know."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import hivemind
import torch
from transformers import GenerationConfig, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from shardnet.client import generation
from shardnet.client.conversation import Conversation
from shardnet.client.routing import RouteHop
from shardnet.client.session import InferenceSession, forward_chain
from shardnet.client.swarm_view import SwarmView
from shardnet.client.transport import Transport
from shardnet.errors import ConfigError, GenerationError
from shardnet.models import Checkpoint, ClientHead, adapter_for, load_config

logger = logging.getLogger(__name__)


class ShardedModel:
    """Embeddings, final norm and LM head locally; every transformer block on the swarm.

    ``model(input_ids, attention_mask=...)`` returns ``.logits`` like a transformers causal LM;
    ``model.generate(...)`` takes transformers' generation kwargs; ``model.inference_session(max_length)``
    keeps the servers' KV caches across calls.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        generation_config: GenerationConfig,
        head: ClientHead,
        swarm: SwarmView,
        dtype: torch.dtype,
        route_timeout_s: float,
        request_timeout_s: float,
        max_message_bytes: int,
    ):
        self.config = config
        self.generation_config = generation_config
        self.head = head
        self.swarm = swarm
        self.dtype = dtype
        self.route_timeout_s = route_timeout_s
        self.request_timeout_s = request_timeout_s
        self.transport = Transport(max_message_bytes)
        self._conversation: Conversation | None = None
        self._route: list[RouteHop] | None = None
        self._route_time = 0.0

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        initial_peers: Sequence[str] = (),
        *,
        model_id: str | None = None,
        dtype: torch.dtype = torch.float32,
        dht: hivemind.DHT | None = None,
        route_timeout_s: float = 30.0,
        request_timeout_s: float = 600.0,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> ShardedModel:
        """Load the client-side weights from a local model folder and join the swarm.

        ``dtype`` is the dtype of the local parts and of the activations sent; only servers computing in
        the same dtype are used. ``route_timeout_s``: how long to wait for servers covering every block.
        """
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(
                f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16"
            )
        if not initial_peers and dht is None:
            raise ConfigError("initial_peers is empty: pass the multiaddrs printed by `shardnet dht`")
        config = load_config(model_path)
        head = adapter_for(config).load_head(Checkpoint(model_path), config, dtype)
        try:
            generation_config = GenerationConfig.from_pretrained(model_path, local_files_only=True)
        except OSError:
            generation_config = GenerationConfig.from_model_config(config)
        swarm = SwarmView.connect(model_path, initial_peers, model_id=model_id, dht=dht)
        return cls(
            config,
            generation_config,
            head,
            swarm,
            dtype,
            route_timeout_s,
            request_timeout_s,
            max_message_bytes,
        )

    @property
    def model_id(self) -> str:
        return self.swarm.model_id

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    # ---- routing and sessions ----

    def route(self, refresh: bool = False) -> list[RouteHop]:
        """The current chain of servers; looked up at most once per ``route_timeout_s`` unless refreshed."""
        if refresh or self._route is None or time.monotonic() - self._route_time > self.route_timeout_s:
            self._route = self.swarm.route(self.dtype, self.route_timeout_s)
            self._route_time = time.monotonic()
        return self._route

    def _open_chain(self, batch_size: int, max_length: int) -> InferenceSession:
        return InferenceSession(
            self.transport, self.route(), self.model_id, batch_size, max_length, self.request_timeout_s
        )

    @contextlib.contextmanager
    def inference_session(self, max_length: int) -> Iterator[Conversation]:
        """Keep the servers' KV caches across generate()/forward() calls inside the ``with`` block."""
        if self._conversation is not None:
            raise GenerationError("an inference session is already open on this model")
        if max_length < 1:
            raise GenerationError("max_length must be at least 1")
        conversation = Conversation(self._open_chain, self.head, max_length, self.dtype)
        self._conversation = conversation
        try:
            yield conversation
        finally:
            self._conversation = None
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
        if self._conversation is not None:
            self._conversation.check_room(input_ids.shape[0], input_ids.shape[1])
            self._conversation.append(input_ids, attention_mask)
            return CausalLMOutputWithPast(logits=self._conversation.flush(last_only=False))
        hidden = self.head.embed(input_ids).to(self.dtype)  # [batch, seq, hidden]
        hidden = forward_chain(
            self.transport,
            self.route(),
            self.model_id,
            hidden,
            attention_mask,
            position_ids,
            self.request_timeout_s,
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
        """
        input_ids = _as_ids(input_ids if input_ids is not None else inputs)
        config = generation.resolve_config(self.generation_config, generation_config, kwargs)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise GenerationError(
                f"attention_mask shape {list(attention_mask.shape)} != input_ids shape {list(input_ids.shape)}"
            )
        conversation = self._conversation
        if conversation is not None:
            budget = generation.new_token_budget(config, conversation.ids.shape[1] + input_ids.shape[1])
            conversation.check_room(input_ids.shape[0], input_ids.shape[1] + budget)
            return generation.generate(conversation, input_ids, attention_mask, config, streamer)
        budget = generation.new_token_budget(config, input_ids.shape[1])
        with self.inference_session(max_length=input_ids.shape[1] + max(budget, 1)) as conversation:
            return generation.generate(conversation, input_ids, attention_mask, config, streamer)

    # ---- lifetime ----

    def close(self) -> None:
        if self._conversation is not None:
            self._conversation.close()
        self.transport.close()
        self.swarm.close()

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
    return input_ids.to(torch.long)
