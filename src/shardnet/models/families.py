"""The architectures shardnet serves: one declarative entry per family of the standard decoder layout.

Everything else (the decoder layer, attention, MLP or mixture of experts, norms, rotary embedding,
sliding windows, weight layout) is transformers' own code, built and loaded by ``decoder.DecoderAdapter``.
An entry says only what differs in how the model's forward strings those parts together. Adding an
architecture is a new entry here plus a line in tests/test_conformance.py.

Nothing is needed for mixture-of-experts router outputs: transformers 5's decoder layers return hidden
states only (router logits are recorded by hooks when asked for, which inference never does).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one family's ``<Family>Model.forward`` runs the decoder, as far as a span must repeat it."""

    model_types: tuple[str, ...]  # transformers ``model_type`` values this entry serves
    layers: str = "layers"  # attribute of the base model holding the decoder blocks (ModuleList)
    token_embedding: str = "embed_tokens"  # attribute of the base model embedding token ids
    final_norm: str = "norm"  # attribute of the base model normalizing the last hidden states
    # "rotary": one rotary module gives (cos, sin) to every layer; "rotary_per_layer_type": it is called
    # once per layer type (gemma3: local and global layers rotate differently); "learned": a position
    # embedding table added to the token embeddings on the client (gpt2), nothing per layer.
    positions: str = "rotary"
    position_embedding: str | None = None  # attribute of the learned position table ("learned" only)


FAMILIES: tuple[Family, ...] = (
    # Gemma2's embedding module scales by sqrt(hidden_size) itself; the final logit soft-capping is
    # read from the config, so Gemma needs no entry field of its own.
    Family(("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "olmo2", "mixtral", "qwen2_moe")),
    Family(("gemma3_text",), positions="rotary_per_layer_type"),
    # The architecture of the small open models this project grew from: learned absolute positions,
    # `transformer.h.N` blocks, no rotary embedding.
    Family(
        ("gpt2",),
        layers="h",
        token_embedding="wte",
        final_norm="ln_f",
        positions="learned",
        position_embedding="wpe",
    ),
)
