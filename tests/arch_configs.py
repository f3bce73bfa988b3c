"""Tiny random configs, one per supported architecture, for the conformance suite.

4 layers, hidden 64, vocab 256. Sliding-window families get a window of 4 (conformance prompts are
longer) and a mix of full and sliding layers where the family allows; the MoE families get 4 experts
with 2 active, and Qwen2-MoE a dense first layer, so that a block's index matters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers import models as hf

WINDOW = 4
_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_MIXED = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]

ARCHITECTURES: dict[str, PretrainedConfig] = {
    "llama": hf.llama.LlamaConfig(**_COMMON),
    "mistral": hf.mistral.MistralConfig(**_COMMON, sliding_window=WINDOW),
    "qwen2": hf.qwen2.Qwen2Config(
        **_COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2
    ),
    "qwen3": hf.qwen3.Qwen3Config(
        **_COMMON, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2
    ),
    "gemma2": hf.gemma2.Gemma2Config(
        **{**_COMMON, "tie_word_embeddings": True},
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3_text": hf.gemma3.Gemma3TextConfig(
        **{**_COMMON, "tie_word_embeddings": True},
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=_MIXED,
        final_logit_softcapping=30.0,
    ),
    "phi3": hf.phi3.Phi3Config(**_COMMON),
    "olmo2": hf.olmo2.Olmo2Config(**_COMMON),
    "mixtral": hf.mixtral.MixtralConfig(
        **_COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW
    ),
    "qwen2_moe": hf.qwen2_moe.Qwen2MoeConfig(
        **_COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[0],
    ),
    "gpt2": hf.gpt2.GPT2Config(
        vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2
    ),
}


def build_model(name: str, path: Path, seed: int = 0) -> Path:
    """Save a random float32 model of architecture ``name`` with save_pretrained (safetensors)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[name].__class__(**ARCHITECTURES[name].to_dict()))
    # Random init gives near-uniform logits; scale the output so greedy choices are not near-ties.
    with torch.no_grad():
        output = model.get_output_embeddings().weight
        output.mul_(4.0 if output is model.get_input_embeddings().weight else 8.0)
    model.save_pretrained(path)
    return path
