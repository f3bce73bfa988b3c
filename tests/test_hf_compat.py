"""models/hf_compat.py against the installed transformers: what it assumes of upstream still holds.

These run in well under a second; the canary runs them (with the rest of its subset) on the newest and
the oldest transformers pyproject.toml allows.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import GenerationMixin, LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from shardnet.models import hf_compat

pytestmark = pytest.mark.canary


def _named(function) -> bool:
    return hf_compat.CACHE_KWARG in inspect.signature(function).parameters


def test_the_cache_name_is_the_one_the_installed_transformers_uses():
    assert _named(create_causal_mask)
    assert _named(LlamaDecoderLayer.forward)
    assert _named(GenerationMixin.prepare_inputs_for_generation)
    assert hf_compat.CACHE_KWARG in {field for field in CausalLMOutputWithPast.__dataclass_fields__}


def test_reading_and_passing_the_cache_sets_off_no_deprecation():
    cache = hf_compat.TensorlessCache()
    out = CausalLMOutputWithPast(logits=torch.zeros(1), **hf_compat.cache_kwargs(cache))
    assert hf_compat.cache_in(out) is cache
    assert hf_compat.pop_cache({"past_key_values": cache}) is cache
    with pytest.raises(TypeError, match="not both"):
        hf_compat.pop_cache({"cache": cache, "past_key_values": cache})


def test_a_tensorless_cache_answers_what_generate_asks():
    cache = hf_compat.TensorlessCache()
    assert cache.get_recurrent_states_to_keep() == 0 and not cache.is_compileable
    cache.activate_past_recording(recurrent_states_to_keep=3)  # 5.24+ passes it; older versions none


def test_a_decoder_layer_runs_with_the_session_cache_and_the_masks():
    config = LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    cache = hf_compat.session_cache(config)
    hidden = torch.randn(1, 3, 16)  # [batch, seq, hidden]
    positions = torch.arange(3)[None]
    rotary = hf_compat.rotary_module(type("Base", (), {"rotary_emb": _rotary(config)})())
    mask = hf_compat.attention_mask("full_attention", config, hidden, None, cache, positions, 0)
    with torch.no_grad():
        out = hf_compat.run_layer(
            layer,
            hidden,
            mask,
            positions,
            cache,
            hf_compat.rotary_embeddings(rotary, hidden, positions, None),
        )
    assert out.shape == hidden.shape and cache.get_seq_length() == 3


def _rotary(config):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config)
