"""ShardedModel: a causal LM whose blocks run on the swarm, with the Hugging Face API people know."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import hivemind
import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from shardnet.client.backward import RemoteBlocks, SwarmBlocks
from shardnet.client.config import ClientConfig, peer_set, quant_set
from shardnet.client.conversation import Conversation
from shardnet.client.generation import SwarmGeneration, as_ids, require_remote
from shardnet.client.planner import RoutePlanner
from shardnet.client.prompt_tuning import PromptTuning
from shardnet.client.remote_cache import RemoteCache
from shardnet.client.routing import RouteHop
from shardnet.client.session import InferenceSession
from shardnet.client.swarm_view import SwarmView
from shardnet.client.transport import Transport
from shardnet.client.trust import ServerTrust
from shardnet.devices import HOST, make_current, resolve_device
from shardnet.errors import ConfigError, GenerationError
from shardnet.models import Checkpoint, ClientHead, adapter_for, hf_compat, load_config
from shardnet.swarm_key import SwarmKey
from shardnet.wire.call_auth import CallSigner

logger = logging.getLogger(__name__)


class ShardedModel(SwarmGeneration, hf_compat.RemoteGenerationMixin, PreTrainedModel, GenerationMixin):
    """A transformers causal LM whose decoder blocks run on the swarm; embeddings, final norm and LM
    head run here.

    ``model(input_ids, attention_mask=..., cache=...)`` returns ``CausalLMOutputWithPast``; the cache
    (``cache=``, or ``past_key_values=`` as transformers before 5.24 named it: both are accepted) is a
    ``RemoteCache`` standing for the servers' KV caches, so transformers' own ``generate()`` runs
    unchanged: greedy, sampling, beam search, assisted decoding, stop strings,
    streamers, ``pipeline("text-generation")``. ``model.inference_session(max_length)`` keeps the
    servers' caches across calls, which then take the new tokens only. One model may be used from
    many threads at once: each ``generate`` has its own session, and an ``inference_session`` belongs
    to the thread (or asyncio task) that opened it.
    """

    config_class = PretrainedConfig
    main_input_name = "input_ids"

    def __init__(
        self,
        config: PretrainedConfig,
        generation_config: GenerationConfig,
        head: ClientHead,
        swarm: SwarmView,
        transport: Transport,
        client_config: ClientConfig,
    ):
        super().__init__(config)
        self.post_init()  # before the head exists: nothing here to initialize, its weights are loaded
        self.head = head
        self.generation_config = generation_config
        self.swarm = swarm
        self.transport = transport
        self.client_config = client_config
        self.health = swarm.health
        # transformers picks its loss by this name, and logs a warning when it cannot (checked on 5.23-5.25).
        self.loss_type = "ForCausalLM"
        self.prompts: PromptTuning | None = (
            None  # trainable prompts, with tuning_mode (client/prompt_tuning.py)
        )
        self.planner = RoutePlanner(swarm, self.health, client_config)
        self.blocks = SwarmBlocks(
            self.planner, transport, self.health, client_config, swarm.model_id, swarm.num_blocks
        )
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
        hedge_floor_s: float = 3.0,
        max_retries: int = 3,
        refresh_interval_s: float = 10.0,
        max_message_bytes: int = 256 * 1024 * 1024,
        push: bool = True,
        swarm_key: str | SwarmKey | None = None,
        verify_fraction: float = 0.05,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        active_adapter: str | None = None,
    ) -> ShardedModel:
        """Load the client-side weights from a local model folder and join the swarm.

        ``dtype`` is the dtype of the local parts and of the activations sent; only servers computing in
        the same dtype are used. ``device``: where the local parts (embeddings, LM head) compute: "cpu"
        (the default), "cuda", "cuda:N", "mps" or "auto"; servers use their own devices either way, and
        activations cross the wire on the host. ``allowed_servers`` / ``blocked_servers``: peer ids (base58) to use
        exclusively / never. ``quant``: quantizations of servers to route through: "none" (exact
        weights, the default), "int8", "nf4", several of them, or "any". ``route_timeout_s``: how long to wait for usable servers covering the blocks.
        ``request_timeout_s``: a server that does not answer one step (or forward) in time counts as
        failed, and the session fails over. A step that runs far past the server's expected time
        (4x, from its round trip, announced throughput and recent steps, and never under
        ``hedge_floor_s``) is hedged sooner: replayed on a replica, so a frozen server costs seconds.
        ``max_retries``: failovers allowed per step (servers found dead when a session is opened on them
        are skipped without counting). ``push``: each
        server passes a step's output straight to the next one (N+1 network delays per step instead of
        2N), when every server of the route supports it; ``push=False`` chains every hop through the client.
        ``swarm_key``: the key of a private swarm, as hex (what ``shardnet keygen`` writes): the client
        reads only records sealed with it and signs every call with it (a ``dht`` passed in must have
        been started with it too). ``verify_fraction``: the probability that each hop's step is computed
        again by another holder of its blocks (1.0: every step, so every output is exact even with a
        server computing wrong; 0: never); a server outvoted by two others is banned in this process
        (``suspected_servers``) and its steps recomputed (README "Verified results"). ``tuning_mode``:
        "ptune" or "deep_ptune" adds ``pre_seq_len`` trainable prompts (``model.prompts``; deep: also
        every block's own), trained through the swarm by ``loss.backward()`` while the model's weights
        stay frozen (README "Fine-tuning"). ``active_adapter``: a LoRA adapter servers load with
        ``serve --adapters``: only servers that announce it are used, and they run every request with it
        (None: the base model, on any server).
        """
        key = SwarmKey.from_hex(swarm_key) if isinstance(swarm_key, str) else swarm_key
        client_config = ClientConfig(
            dtype=dtype,
            device=str(device),
            route_timeout_s=route_timeout_s,
            request_timeout_s=request_timeout_s,
            hedge_floor_s=hedge_floor_s,
            max_retries=max_retries,
            refresh_interval_s=refresh_interval_s,
            max_message_bytes=max_message_bytes,
            allowed_servers=peer_set(allowed_servers, "allowed_servers"),
            blocked_servers=peer_set(blocked_servers, "blocked_servers") or frozenset(),
            quant=quant_set(quant),
            push=bool(push),
            verify_fraction=float(verify_fraction),
            active_adapter=active_adapter,
        )
        if not initial_peers and dht is None:
            raise ConfigError("initial_peers is empty: pass the multiaddrs printed by `shardnet dht`")
        config = load_config(model_path)
        where = resolve_device(client_config.device, flag="device")  # ConfigError if this machine lacks it
        make_current(where)
        with hf_compat.BUILDING_MODELS:  # no other thread's model skeleton open meanwhile
            head = adapter_for(config).load_head(Checkpoint(model_path), config, dtype, where)
        try:
            generation_config = GenerationConfig.from_pretrained(model_path, local_files_only=True)
        except OSError:
            generation_config = GenerationConfig.from_model_config(config)
        # The DHT first: hivemind forks its process, which must happen before gRPC channels exist.
        signer = CallSigner(key) if key is not None else None
        transport = Transport(max_message_bytes, signer)  # no channel exists before the first call
        swarm = SwarmView.connect(
            model_path,
            initial_peers,
            model_id=model_id,
            dht=dht,
            swarm_key=key,
            health=ServerTrust.shared(),
            transport=transport,
            refresh_interval_s=refresh_interval_s,
        )
        with hf_compat.BUILDING_MODELS:
            model = cls(config, generation_config, head, swarm, transport, client_config)
        if tuning_mode is not None:
            with hf_compat.BUILDING_MODELS:
                model.prompts = PromptTuning(
                    tuning_mode, pre_seq_len, int(config.hidden_size), swarm.num_blocks, dtype
                ).to(where)
            model.head.requires_grad_(False)  # only the prompts train; the model stays as it is
        return model

    @property
    def last_route(self) -> list[RouteHop]:
        """The route of this thread's (or asyncio task's) most recent call or session."""
        return list(self._last_route.get())

    @last_route.setter
    def last_route(self, route: list[RouteHop]) -> None:
        self._last_route.set(tuple(route))

    @property
    def suspected_servers(self) -> frozenset[str]:
        """Peer ids of the servers found computing wrong, not used again in this process."""
        return self.health.suspected()

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

        Inside it, calls take the new tokens only and continue the conversation exactly as one local
        ``generate()`` over the concatenation would. The session belongs to the thread (or asyncio task)
        that opened it; calls from other threads run in sessions of their own. ``session.route`` tells
        the servers it runs on.
        """
        if self._conversation.get() is not None:
            raise GenerationError("an inference session is already open on this model in this thread")
        if max_length < 1:
            raise GenerationError("max_length must be at least 1")
        conversation = Conversation(self._open_chain, max_length, self.generation_config)
        token = self._conversation.set(conversation)
        try:
            yield conversation
        finally:
            self._conversation.reset(token)
            conversation.close()

    def new_cache(self, max_length: int) -> RemoteCache:
        """An empty cache for ``max_length`` positions, to pass as ``cache`` in a hand-written loop."""
        return RemoteCache(self._open_chain, max_length)

    # ---- what transformers needs of a model ----

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.head.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: RemoteCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [batch, seq, vocab] of the given positions, as transformers' causal LMs compute them.

        With a ``RemoteCache`` the positions extend the servers' caches; without one the call is stateless
        (nothing stays on the servers). Inside ``inference_session`` the tokens extend the session.
        """
        if "past_key_values" in kwargs:  # the name before transformers 5.24, whose generate() passes it
            cache = hf_compat.pop_cache({"cache": cache, "past_key_values": kwargs.pop("past_key_values")})
        if kwargs:  # as transformers' models do: generate() forwards what it was given (tokenizer, ...)
            logger.debug("forward() ignores %s", ", ".join(sorted(kwargs)))
        if output_attentions or output_hidden_states:
            raise GenerationError("attentions and hidden states stay on the servers: they cannot be returned")
        if (input_ids is None) == (inputs_embeds is None):
            raise GenerationError("pass exactly one of input_ids and inputs_embeds")
        input_ids = None if input_ids is None else as_ids(input_ids)
        attention_mask = None if attention_mask is None else attention_mask.to(HOST, torch.long)
        conversation = self._conversation.get()
        if cache is None and conversation is not None and input_ids is not None:
            out = conversation.forward(self.forward, input_ids, attention_mask)
            self.last_route = conversation.route
            return out
        require_remote(cache)
        if self.prompts is not None:  # prompt tuning: the prompts go before the tokens' embeddings
            if cache is not None:
                raise GenerationError(
                    f"tuning_mode={self.prompts.mode!r}: the servers' caches do not keep the prompts yet; call "
                    "the model without a cache (training, evaluation, generate(..., use_cache=False))"
                )
            if inputs_embeds is None:
                inputs_embeds = self.head.embed_tokens(input_ids.to(self.head.device))
            inputs_embeds, attention_mask, position_ids = self.prompts.prepend(
                inputs_embeds, attention_mask, position_ids
            )
            input_ids = None
        batch, new = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:  # as transformers' forward: the positions after the cached ones
            position_ids = torch.arange(past, past + new).unsqueeze(0).expand(batch, -1)
        position_ids = position_ids.to(HOST, torch.long)[:, -new:]
        step_mask = None
        if attention_mask is not None:
            if attention_mask.shape[0] != batch or attention_mask.shape[1] not in (new, past + new):
                raise GenerationError(
                    f"attention_mask shape {list(attention_mask.shape)} must be [{batch}, {past + new}]"
                )
            step_mask = attention_mask[:, -new:]  # the servers keep the mask of what they hold
        # Gradients flow through a stateless call (client/backward.py); a session's cache keeps none.
        with contextlib.nullcontext() if cache is None else torch.no_grad():
            hidden = self.head.embed(input_ids, position_ids, inputs_embeds).to(
                self.dtype
            )  # [batch, new, hidden]
            if cache is not None:
                hidden = cache.step(hidden.to(HOST), step_mask, position_ids)
                self.last_route = cache.route
            else:
                deep = None if self.prompts is None else self.prompts.deep_prompts(self.dtype)
                if hidden.requires_grad or (deep is not None and deep.requires_grad):
                    route: list[RouteHop] = []
                    deep = None if deep is None else deep.to(HOST)
                    hidden = RemoteBlocks.apply(
                        hidden.to(HOST), deep, self.blocks, attention_mask, position_ids, route
                    )
                    self.last_route = route
                else:
                    deep = None if deep is None else deep.to(HOST)
                    hidden, self.last_route = self.blocks.forward(
                        hidden.to(HOST), attention_mask, position_ids, prompts=deep
                    )
                if self.prompts is not None:
                    hidden = self.prompts.strip(hidden)
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                hidden = hidden[:, logits_to_keep.to(HOST)]
            logits = self.head.logits(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits.float(), labels.to(logits.device), self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **hf_compat.cache_kwargs(cache))

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
