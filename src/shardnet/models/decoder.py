"""DecoderAdapter: the one adapter for transformers' standard decoder-only layout, configured by a Family.

A span holds transformers' own decoder blocks ``start:end``, built by ``AutoModelForCausalLM`` (on meta)
with their absolute layer indices, so everything that depends on a layer's index (its KV-cache slot,
sliding or full attention, a dense or sparse MLP) is exactly as in the full model; the session's
``DynamicCache`` is the full model's, with only the span's layers ever filled. ``run`` repeats what
``<Family>Model.forward`` does between the embedding and the final norm: one mask per attention type
(sized against the first cache layer of that type inside the span), the rotary (cos, sin), then the
blocks. The client head is the same model's embedding, final norm and LM head (with Gemma's embedding
final logit soft-capping where the config asks for it).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from shardnet.errors import ModelLoadError
from shardnet.models import hf_compat
from shardnet.models.base import CPU, ClientHead, ModelAdapter, SpanInputs, SpanModule, register
from shardnet.models.checkpoint import Checkpoint
from shardnet.models.families import FAMILIES, Family
from shardnet.models.stacked_cache import stacked_cache
from shardnet.models.transformers_loading import load_parts, still_on_meta

if TYPE_CHECKING:  # transformers' modeling code loads where a model is built (hf_compat)
    from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)


def layer_types(config: PretrainedConfig) -> list[str]:
    """Attention type of every layer, as the model's forward picks its mask."""
    declared = getattr(config, "layer_types", None)
    if declared:
        types = list(declared)
    elif getattr(config, "sliding_window", None) is not None:  # mistral, mixtral: one window for all
        types = ["sliding_attention"] * config.num_hidden_layers
    else:
        types = ["full_attention"] * config.num_hidden_layers
    unknown = sorted(set(types) - hf_compat.MASK_KINDS)
    if unknown:
        raise ModelLoadError(f"{config.model_type}: layer types {unknown} are not supported yet")
    return types


class DecoderSpan(SpanModule):
    def __init__(self, family: Family, model: PreTrainedModel, start: int, end: int):
        super().__init__()
        self.start, self.end = start, end
        self.family = family
        self.config = model.config  # the full model's, with transformers' attention implementation resolved
        self.layer_types = layer_types(self.config)
        base = model.base_model
        self.blocks = nn.ModuleList(getattr(base, family.layers)[start:end])
        self.rotary = None if family.positions == "learned" else hf_compat.rotary_module(base)

    def new_cache(self) -> hf_compat.Cache:
        # Sliding-window layers keep every position (within the session's max_length, which the cache
        # budget counts anyway) until cropped, so a rollback past the window stays exact.
        return hf_compat.session_cache(self.config)

    def crop_cache(self, cache: hf_compat.Cache, start: int, end: int, keep: int) -> None:
        hf_compat.crop_layers(cache, start, end, keep)

    def reorder_cache(self, cache: hf_compat.Cache, start: int, end: int, rows: torch.Tensor) -> None:
        hf_compat.reorder_layers(cache, start, end, rows)

    def export_cache(self, cache: hf_compat.Cache, start: int, end: int) -> list:
        return hf_compat.export_layers(cache, start, end)

    def import_cache(self, cache: hf_compat.Cache, start: int, end: int, layers: list) -> None:
        hf_compat.import_layers(cache, start, end, layers)

    def stack_caches(
        self, caches: list[hf_compat.Cache], batch_sizes: list[int], start: int, end: int, frame: int
    ) -> hf_compat.Cache:
        return stacked_cache(caches, batch_sizes, start, end, frame)

    @torch.inference_mode()
    def run(
        self,
        hidden_states: torch.Tensor,
        inputs: SpanInputs,
        cache: hf_compat.Cache | None,
        start: int,
        end: int,
    ) -> torch.Tensor:
        return self._run(hidden_states, inputs, cache, start, end)

    def input_gradient(
        self,
        hidden_states: torch.Tensor,
        inputs: SpanInputs,
        grad_outputs: torch.Tensor,
        start: int,
        end: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.enable_grad():
            given = hidden_states.detach().requires_grad_(True)
            wanted = [given]
            if inputs.prompts is not None:
                prompts = inputs.prompts.detach().requires_grad_(True)
                inputs = dataclasses.replace(inputs, prompts=prompts)
                wanted.append(prompts)
            out = self._run(given, inputs, None, start, end)
            # Only these gradients are asked for: nothing accumulates in the weights' .grad.
            grads = torch.autograd.grad(out, wanted, grad_outputs.to(out.dtype))
        return grads[0], (grads[1] if len(grads) > 1 else None)  # [batch, seq, hidden], [blocks, k, hidden]

    def _run(
        self,
        hidden_states: torch.Tensor,
        inputs: SpanInputs,
        cache: hf_compat.Cache | None,
        start: int,
        end: int,
    ) -> torch.Tensor:
        types = self.layer_types[start:end]
        masks = {
            kind: hf_compat.attention_mask(
                kind,
                self.config,
                hidden_states,
                inputs.attention_mask,
                cache,
                inputs.position_ids,
                layer_idx=start + types.index(kind) if cache is not None else None,
            )
            for kind in set(types)
        }
        rotations = self._rotations(hidden_states, inputs.position_ids, set(types))
        for offset, block in enumerate(self.blocks[start - self.start : end - self.start]):
            kind = types[offset]
            rotation = None if rotations is None else rotations[kind]
            if inputs.prompts is not None:  # deep prompt tuning: this block's prompts on the first positions
                first = inputs.prompts.shape[1]
                prompted = hidden_states[:, :first] + inputs.prompts[offset].to(hidden_states.dtype)
                hidden_states = torch.cat([prompted, hidden_states[:, first:]], dim=1)
            hidden_states = hf_compat.run_layer(
                block, hidden_states, masks[kind], inputs.position_ids, cache, rotation
            )
        return hidden_states  # [batch, new, hidden]

    def _rotations(self, hidden: torch.Tensor, position_ids: torch.Tensor, kinds: set[str]) -> dict | None:
        """(cos, sin) per attention type, or None for learned absolute positions."""
        if self.rotary is None:
            return None
        if self.family.positions == "rotary_per_layer_type":
            return {
                kind: hf_compat.rotary_embeddings(self.rotary, hidden, position_ids, kind) for kind in kinds
            }
        rotation = hf_compat.rotary_embeddings(self.rotary, hidden, position_ids, None)
        return dict.fromkeys(kinds, rotation)


class DecoderHead(ClientHead):
    def __init__(self, family: Family, model: PreTrainedModel):
        super().__init__()
        base = model.base_model
        self.embed_tokens = getattr(base, family.token_embedding)
        self.position_table = getattr(base, family.position_embedding) if family.position_embedding else None
        self.norm = getattr(base, family.final_norm)
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token (and learned position) embeddings, on the head's device, from ids on any device."""
        position_ids = position_ids.to(self.device)
        if inputs_embeds is not None:  # used as given, as transformers' models do (no Gemma scaling)
            hidden = inputs_embeds.to(self.device, self.embed_tokens.weight.dtype)
        else:
            hidden = self.embed_tokens(
                input_ids.to(self.device)
            )  # [batch, seq, hidden] (Gemma scales itself)
        if self.position_table is not None:
            hidden = hidden + self.position_table(position_ids)
        return hidden

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits on the head's device; the hidden states may come from the wire, on the host."""
        logits = self.lm_head(self.norm(hidden_states.to(self.device)))  # [batch, seq, vocab]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class DecoderAdapter(ModelAdapter):
    def __init__(self, family: Family):
        self.family = family
        self.model_types = family.model_types

    def _prefixes(self, model: PreTrainedModel) -> str:
        """Checkpoint key prefix of the base model: 'model.' or 'transformer.' (optional in old files)."""
        return rf"(?:{re.escape(model.base_model_prefix)}\.)?"

    def load_span(
        self,
        checkpoint: Checkpoint,
        config: PretrainedConfig,
        start: int,
        end: int,
        dtype: torch.dtype,
        device: torch.device = CPU,
    ) -> DecoderSpan:
        model = hf_compat.skeleton(config, dtype)
        layer_key = re.compile(rf"^{self._prefixes(model)}{re.escape(self.family.layers)}\.(\d+)\.")

        def in_span(key: str) -> bool:
            match = layer_key.match(key)
            return bool(match) and start <= int(match.group(1)) < end

        load_parts(model, checkpoint, in_span, dtype, device)
        span = DecoderSpan(self.family, model, start, end).to(device)  # the buffers; weights are there
        _require_loaded(span, f"blocks {start}:{end}")
        return span.eval()

    def load_head(
        self, checkpoint: Checkpoint, config: PretrainedConfig, dtype: torch.dtype, device: torch.device = CPU
    ) -> DecoderHead:
        model = hf_compat.skeleton(config, dtype)
        family = self.family
        parts = [family.token_embedding, family.final_norm, *filter(None, [family.position_embedding])]
        head_name = next(
            name for name, module in model.named_modules() if module is model.get_output_embeddings()
        )
        pattern = re.compile(
            rf"^(?:{self._prefixes(model)}(?:{'|'.join(map(re.escape, parts))})|{re.escape(head_name)})\."
        )
        load_parts(model, checkpoint, lambda key: bool(pattern.match(key)), dtype, device)
        if (
            getattr(model.config, "tie_word_embeddings", False)
            or model.get_output_embeddings().weight.is_meta
        ):
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        head = DecoderHead(family, model).to(device)  # the buffers; weights are there
        _require_loaded(head, "embeddings, norm and LM head")
        return head.eval()


def _require_loaded(module: nn.Module, what: str) -> None:
    missing = still_on_meta(module)
    if missing:
        raise ModelLoadError(f"{what}: missing weights {missing[:5]}")


for _family in FAMILIES:
    register(DecoderAdapter(_family))
