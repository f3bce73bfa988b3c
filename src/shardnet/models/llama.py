"""Llama family adapter (Llama 1/2/3, SmolLM, and other ``LlamaForCausalLM`` checkpoints).

The span runs transformers' own decoder layers, rotary embedding and mask construction, exactly as
``LlamaModel.forward`` does, so a swarm's numbers equal a local transformers model's.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from shardnet.models.base import (
    CPU,
    ClientHead,
    ModelAdapter,
    SpanInputs,
    SpanModule,
    load_module_state,
    register,
)
from shardnet.models.checkpoint import Checkpoint

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """The config of a model made of blocks start:end only (layer-wise fields sliced)."""
    span_config = copy.deepcopy(config)
    span_config.num_hidden_layers = end - start
    if getattr(config, "layer_types", None):
        span_config.layer_types = list(config.layer_types[start:end])
    span_config._attn_implementation = "sdpa"
    return span_config


class LlamaSpan(SpanModule):
    def __init__(self, config: PretrainedConfig, start: int, end: int):
        super().__init__()
        self.start, self.end = start, end
        self.config = _span_config(config, start, end)
        # Built on meta so nothing is allocated until the span's own weights are assigned.
        with torch.device("meta"):
            self.layers = nn.ModuleList(
                [LlamaDecoderLayer(self.config, local_idx) for local_idx in range(end - start)]
            )
        self.rotary = LlamaRotaryEmbedding(config=self.config)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def run(
        self,
        hidden_states: torch.Tensor,
        inputs: SpanInputs,
        cache: DynamicCache | None,
        start: int,
        end: int,
    ) -> torch.Tensor:
        first, last = start - self.start, end - self.start
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=inputs.attention_mask,
            past_key_values=cache,
            position_ids=inputs.position_ids,
            layer_idx=first if cache is not None else None,
        )
        position_embeddings = self.rotary(hidden_states, position_ids=inputs.position_ids)
        for layer in self.layers[first:last]:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=inputs.position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        return hidden_states  # [batch, new, hidden]


class LlamaHead(ClientHead):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
            self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # [batch, seq, hidden]

    @torch.inference_mode()
    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden_states))  # [batch, seq, vocab]


class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)

    def load_span(
        self,
        checkpoint: Checkpoint,
        config: PretrainedConfig,
        start: int,
        end: int,
        dtype: torch.dtype,
        device: torch.device = CPU,
    ) -> LlamaSpan:
        span = LlamaSpan(config, start, end)

        def local_name(key: str) -> str | None:
            match = _LAYER_KEY.match(key)
            if match and start <= int(match.group(1)) < end:
                return f"{int(match.group(1)) - start}.{match.group(2)}"
            return None

        state = checkpoint.read_prefixed(local_name, dtype, device)
        load_module_state(span.layers, state, f"blocks {start}:{end}")
        return span.to(device).eval()  # the weights are there already; this moves the rotary buffers

    def load_head(self, checkpoint: Checkpoint, config: PretrainedConfig, dtype: torch.dtype) -> LlamaHead:
        head = LlamaHead(config)
        tied = getattr(config, "tie_word_embeddings", False) or not checkpoint.has("lm_head.weight")
        keys = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
        if not tied:
            keys["lm_head.weight"] = "lm_head.weight"
        loaded = checkpoint.read(keys, dtype)
        state = {keys[key]: tensor for key, tensor in loaded.items()}
        if tied:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        load_module_state(head, state, "embeddings, norm and LM head")
        return head.eval()


register(LlamaAdapter())
