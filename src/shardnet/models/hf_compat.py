"""Every private or version-sensitive transformers API shardnet uses, and nothing else.

shardnet supports transformers 5.23 to 5.25 (``pyproject.toml``; the lock pins 5.25.0). Each entry
below names the upstream code it leans on, the versions it was checked on, and what breaks when that
code moves. ``scripts/canary.sh`` runs the core tests against the newest release the range allows and
``scripts/canary.sh --oldest`` against 5.23.0; when one fails, this file is where to look first.

The one rename that matters so far: in 5.24 the KV cache argument ``past_key_values`` became ``cache``
in ``generate()``, ``prepare_inputs_for_generation``, every model and decoder-layer ``forward``, the
masking utilities and the model output classes. The old name still works there as a deprecated alias
that warns (``FutureWarning``, or a logged warning for ``ModelOutput.past_key_values``), so code here
always passes and reads the name the installed version uses: ``CACHE_KWARG``.

The rest of shardnet imports only transformers' public, stable API (``AutoConfig``, ``AutoTokenizer``,
``GenerationConfig``, ``GenerationMixin``, ``PreTrainedModel``, streamers, ``CausalLMOutputWithPast``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import transformers

# Private modules: their import paths are part of what this file pins (checked 5.23.0, 5.24.0, 5.25.0).
# cache_utils loads in milliseconds; the heavier ones (masking_utils, modeling_utils and the loading
# code, seconds together) load where they are first used, so importing shardnet.models stays light.
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer
from transformers.utils import logging as hf_logging

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

TRANSFORMERS_VERSION = transformers.__version__
OLDEST_SUPPORTED = "5.23.0"  # the lower bound in pyproject.toml, tested by `scripts/canary.sh --oldest`

# ---- the cache's name ------------------------------------------------------------------------------
# 5.23: `past_key_values`; 5.24, 5.25: `cache` (the old name a deprecated alias until 5.40 / 6.0).
# Breaks if a later version renames it again: generate() would then run without our RemoteCache (every
# step a stateless one-token forward: wrong tokens, no error), which tests/test_generate_modes.py and
# the canary catch; tests/test_generate_modes.py also checks this name against the signature of
# masking_utils.create_causal_mask, which carries the new name exactly when the models do.
CACHE_RENAMED_IN = (5, 24)
_RELEASE = tuple(int(part) for part in re.findall(r"\d+", TRANSFORMERS_VERSION)[:2])  # (major, minor)
CACHE_KWARG = "cache" if _RELEASE >= CACHE_RENAMED_IN else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")  # what ShardedModel accepts from its callers, either version


def cache_kwargs(cache: Cache | None) -> dict:
    """``{name: cache}`` under the name the installed transformers expects (generate, forward, outputs)."""
    return {CACHE_KWARG: cache}


def cache_in(mapping) -> Cache | None:
    """The cache in generate()'s ``model_kwargs`` or in a model output, read under the installed name
    (a ``ModelOutput``'s ``past_key_values`` property logs a deprecation warning on 5.24+)."""
    return mapping.get(CACHE_KWARG)


def pop_cache(kwargs: dict) -> Cache | None:
    """Take the cache out of a caller's keyword arguments under either name, quietly: ShardedModel keeps
    both working for its users whatever transformers is installed. Both at once is a TypeError."""
    given = [name for name in _CACHE_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise TypeError("pass the cache as `cache` or as `past_key_values`, not both")
    values = [kwargs.pop(name, None) for name in _CACHE_NAMES]
    return next((value for value in values if value is not None), None)


# ---- generate() hooks ------------------------------------------------------------------------------


class RemoteGenerationMixin:
    """What a ``PreTrainedModel`` whose KV caches live elsewhere tells transformers' ``generate()``.

    - ``_prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
      max_cache_length)``: the private hook generate() calls once before its loop to build the cache
      (checked 5.23.0 to 5.25.0, same signature). We take over the user-given cache here instead of
      letting it build a DynamicCache, and size it for the generation (``prepare_remote_cache``).
      Breaks if renamed or re-signed: generate() would then build a local DynamicCache that nothing
      fills (TypeError in forward) -- loud, not wrong.
    - ``cache._is_user_defined = True``: read by generate() (5.23.0 to 5.25.0) to return the cache in
      ``return_dict_in_generate`` outputs and keep it usable afterwards. Breaks quietly: the output
      would not carry the cache.
    - ``_supports_*`` flags and ``_can_set_experts_implementation``: PreTrainedModel's private class
      checks (5.23.0 to 5.25.0) that refuse an ``attn_implementation`` or MoE ``experts_implementation``
      the class does not declare; attention runs on the servers, so we accept every one.
    """

    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # mixture-of-experts layers run on the servers too (qwen2_moe, mixtral)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ) -> None:
        cache = cache_in(model_kwargs)
        if cache is None:
            return  # use_cache=False: every step is a stateless forward of the whole sequence
        self.prepare_remote_cache(cache, generation_config, max_cache_length)
        cache._is_user_defined = True

    def prepare_remote_cache(self, cache, generation_config, max_cache_length: int) -> None:
        raise NotImplementedError


# transformers' assisted decoding calls the assistant's generate() with a GenerationConfig and keyword
# arguments together (candidate_generator.AssistedCandidateGenerator._prepare_generation_args, checked
# 5.23.0 to 5.25.0), which its own generate() then logs as deprecated, once per process, at WARNING: a
# line on every user's terminal that nothing on their side or ours can avoid.
ASSISTED_DECODING_NOISE = "Passing `generation_config` together with generation-related arguments"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def upstream_noise_dropped(assisted: bool) -> Iterator[None]:
    """Inside the block, transformers' generation logger drops the warning its own assisted decoding sets
    off (when ``assisted``); everything else it logs passes."""
    if not assisted:
        yield
        return
    hf_generation = logging.getLogger("transformers.generation.utils")
    drop = _DropMessage(ASSISTED_DECODING_NOISE)
    hf_generation.addFilter(drop)
    try:
        yield
    finally:
        hf_generation.removeFilter(drop)


# ---- caches ----------------------------------------------------------------------------------------


class TensorlessCache(Cache):
    """A ``Cache`` holding no layers: the base of a cache whose keys and values live on servers.

    generate() asks a cache for more than the ``Cache`` docs promise; with no layers, several of the
    base class's answers are wrong or raise, so they are given here (checked 5.23.0 to 5.25.0):
    ``is_compileable`` (False: never compile), ``get_recurrent_states_to_keep`` (5.24+, called by the
    assisted-decoding candidate generator; the base takes a max() over no layers and raises),
    ``activate_past_recording(**kwargs)`` (5.24+ passes ``recurrent_states_to_keep``), and
    ``is_croppable`` / ``is_initialized`` / ``batch_size``, which subclasses answer. Breaks if
    generate() starts calling another Cache method that iterates layers: an error, not a wrong token.
    """

    is_compileable = False

    def __init__(self):
        super().__init__(layers=[])

    def activate_past_recording(self, **kwargs) -> None:
        """Servers keep every position of a session (within its max_length), so any crop is exact."""

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0  # no linear-attention (recurrent) layers here


def session_cache(config: PretrainedConfig) -> DynamicCache:
    """A server session's KV cache over the whole model (only its span's layers are ever filled).

    ``DynamicCache(config=...)`` picks a sliding or a full layer per ``config.layer_types``;
    ``activate_past_recording()`` keeps sliding layers from dropping what leaves the window until a
    ``crop``, so a rollback past the window stays exact (checked 5.23.0 to 5.25.0; 5.24 added an
    optional keyword). Breaks quietly if recording stops covering sliding layers: assisted decoding
    past a window would then diverge, which the mistral/gemma conformance tests catch.
    """
    cache = DynamicCache(config=config)
    cache.activate_past_recording()
    return cache


def crop_layers(cache: Cache, start: int, end: int, keep: int) -> None:
    """Keep the first ``keep`` positions of layers ``start:end`` (``layer.crop(-n)`` drops the last n)."""
    for layer in cache.layers[start:end]:  # the layers outside the span were never filled
        drop = layer.get_seq_length() - keep
        if drop > 0:
            layer.crop(-drop)


def reorder_layers(cache: Cache, start: int, end: int, rows: torch.Tensor) -> None:
    for layer in cache.layers[start:end]:
        layer.reorder_cache(rows)


def export_layers(cache: Cache, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Layers ``start:end`` as (keys, values, positions seen), for a hand-off to another server.

    A ``DynamicLayer`` keeps every position it saw; a ``DynamicSlidingWindowLayer`` may keep fewer after
    a ``crop`` (its ``get_seq_length()`` is ``cumulative_length``, what it saw). Checked 5.23.0 to
    5.25.0. Breaks if a layer grows state beyond keys, values and that count: an adopted session would
    then diverge, which tests/test_handoff.py catches (it compares tokens with local).
    """
    exported = []
    for layer in cache.layers[start:end]:
        if not layer.is_initialized:
            raise ValueError("a layer of the span holds nothing yet")
        exported.append((layer.keys, layer.values, int(layer.get_seq_length())))
    return exported


def import_layers(
    cache: Cache, start: int, end: int, layers: list[tuple[torch.Tensor, torch.Tensor, int]]
) -> None:
    """Fill the empty layers ``start:end`` of a fresh ``session_cache`` with ``export_layers``' output.

    ``update`` initializes a layer as its first step would (device, dtype); a sliding layer's
    ``cumulative_length`` is then set to what the sender's layer saw (checked 5.23.0 to 5.25.0).
    """
    for layer, (keys, values, seen) in zip(cache.layers[start:end], layers, strict=True):
        layer.update(keys, values)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = seen


class StackedLayer(DynamicLayer):
    """Layer ``index`` of several sessions' caches as one left-padded key/value frame, for one batched
    decode step (``stacked_cache``).

    Leans on the ``CacheLayerMixin`` protocol as attention and the masking utilities use it (checked
    5.23.0 to 5.25.0): ``update(key_states, value_states, *args, **kwargs)`` returns the layer's whole
    keys and values (5.24 added a ``kwargs=`` keyword, passed through), ``get_seq_length()`` and
    ``get_mask_sizes(query_length) -> (kv_length, kv_offset)`` size the mask. Breaks if the mask
    sizing moves elsewhere: batched steps would then attend over the wrong frame, which
    tests/test_batching.py catches on every architecture.
    """

    def __init__(self, parts: list[tuple[CacheLayerMixin, slice]], frame: int):
        super().__init__()
        self.parts = parts  # each session's own layer and its rows in the batch
        self.frame = frame  # positions before this step in the frame: the longest session's
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.frame

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.frame + query_length, 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, new, _ = key_states.shape  # [batch, kv heads, new, head dim]
        length = self.frame + new
        keys = key_states.new_zeros(batch, heads, length, key_states.shape[-1])
        values = value_states.new_zeros(batch, heads, length, value_states.shape[-1])
        for layer, rows in self.parts:
            own_keys, own_values = layer.update(key_states[rows], value_states[rows], *args, **kwargs)
            keys[rows, :, length - own_keys.shape[-2] :] = own_keys
            values[rows, :, length - own_values.shape[-2] :] = own_values
        return keys, values


def layered_cache(layers: list[CacheLayerMixin]) -> Cache:
    return Cache(layers=layers)  # Cache(layers=...) checked 5.23.0 to 5.25.0


def empty_layer() -> CacheLayerMixin:
    return DynamicLayer()


# ---- running transformers' own decoder layers ------------------------------------------------------

MASK_KINDS = frozenset({"full_attention", "sliding_attention"})  # the layer types attention_mask builds


def attention_mask(
    kind: str,
    config: PretrainedConfig,
    hidden_states: torch.Tensor,
    padding_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor,
    layer_idx: int | None,
) -> torch.Tensor | None:
    """The mask ``<Model>Model.forward`` builds for layers of attention type ``kind``.

    ``masking_utils.create_causal_mask`` / ``create_sliding_window_causal_mask`` (checked 5.23.0 to
    5.25.0; their cache argument renamed in 5.24, ``layer_idx`` picks the cache layer that sizes the
    mask). Breaks loudly on a signature change (TypeError), quietly if their sizing changes: the
    exactness and conformance tests compare every architecture's logits with transformers'.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    build = create_causal_mask if kind == "full_attention" else create_sliding_window_causal_mask
    return build(
        config=config,
        inputs_embeds=hidden_states,
        attention_mask=padding_mask,
        position_ids=position_ids,
        layer_idx=layer_idx,
        **cache_kwargs(cache),
    )


def run_layer(
    block: torch.nn.Module,
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    cache: Cache | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """One decoder layer as ``<Model>Model.forward`` calls it (checked 5.23.0 to 5.25.0 on every
    family in ``families.py``: keyword arguments, cache renamed in 5.24; a tensor or, in older
    releases, a tuple whose first item is the hidden states)."""
    extra = {} if position_embeddings is None else {"position_embeddings": position_embeddings}
    out = block(
        hidden_states,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=cache is not None,
        **cache_kwargs(cache),
        **extra,
    )
    return out[0] if isinstance(out, tuple) else out


def rotary_module(base_model: torch.nn.Module) -> torch.nn.Module:
    """The base model's rotary embedding module, ``<Family>Model.rotary_emb`` (checked 5.23.0 to 5.25.0
    on every rotary family; only buffers, computed at construction). The other module names a span and a
    client head use (``layers``, ``embed_tokens``, ``norm``, gpt2's ``h``, ``wte``, ``wpe``, ``ln_f``)
    are declared per family in ``families.py``; a rename fails loading loudly (AttributeError)."""
    return base_model.rotary_emb


def rotary_embeddings(
    rotary: torch.nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) from a model's ``rotary_emb``. Per layer type (gemma3: ``rotary_emb(x, position_ids,
    layer_type)``) or one for all layers (``rotary_emb(x, position_ids)``); checked 5.23.0 to 5.25.0."""
    if layer_type is None:
        return rotary(hidden_states, position_ids)
    return rotary(hidden_states, position_ids, layer_type)


# ---- building and loading models -------------------------------------------------------------------


# accelerate's init_empty_weights patches nn.Module for the whole process while it is open: a thread
# loading weights (or building any module) meanwhile gets its new parameters on meta. Skeletons and loads
# take this lock, and so does a caller building a model from several threads (ShardedModel.from_pretrained).
BUILDING_MODELS = threading.RLock()


def skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM transformers would build for ``config`` in ``dtype``, every parameter on meta.

    Buffers stay real (accelerate's ``init_empty_weights(include_buffers=False)``): they are small and
    computed by the modules' constructors (rotary frequencies, Gemma's embedding scale), not stored in
    checkpoints. ``from_config(config, dtype=...)``: checked 5.23.0 to 5.25.0 with accelerate 1.x.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with BUILDING_MODELS, init_empty_weights(include_buffers=False), quiet():
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def load_state_dict(
    model: PreTrainedModel, state_dict: dict, folder: str, dtype: torch.dtype, device: torch.device
) -> tuple[list[str], list[str]]:
    """Load ``state_dict`` (checkpoint names; values may be lazy safetensors slices) into ``model`` the
    way ``from_pretrained`` does, with the model's registered weight conversions (Mixtral's and
    Qwen2-MoE's per-expert tensors fused into one per layer), straight onto ``device`` in ``dtype``.
    Returns (unexpected keys, problems).

    ``core_model_loading.convert_and_load_state_dict_in_model(model=, state_dict=, load_config=)`` with
    ``modeling_utils.LoadStateDictConfig(pretrained_model_name_or_path=, dtype=, device_map=,
    weight_mapping=)`` and ``conversion_mapping.get_model_conversion_mapping(model)``; its result's
    ``unexpected_keys``, ``error_msgs`` and ``conversion_errors``. Checked 5.23.0 to 5.25.0. These are
    from_pretrained's internals: a change here fails every model load (ModelLoadError or TypeError).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    load_config = LoadStateDictConfig(
        pretrained_model_name_or_path=folder,
        dtype=dtype,
        device_map={"": device},
        weight_mapping=get_model_conversion_mapping(model),
    )
    with BUILDING_MODELS, quiet():  # never while another thread's skeleton is open
        info, _ = convert_and_load_state_dict_in_model(
            model=model, state_dict=state_dict, load_config=load_config
        )
    problems = [*info.error_msgs, *(f"{k}: {v}" for k, v in info.conversion_errors.items())]
    return sorted(info.unexpected_keys), problems


def without_gguf_quantizer(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` as ``from_pretrained(gguf_file=...)`` left it, minus the ``quantization_config`` it
    attaches although the weights are dequantized to float: ``save_pretrained`` refuses a model whose
    quantizer is not serializable (checked 5.23.0 to 5.25.0)."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars and no warnings from transformers' own logger inside the block (loading only
    some of a model's weights is deliberate here); restored after. ``transformers.utils.logging``:
    public, stable across 5.x."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
