"""Load named parts of a checkpoint into transformers' own model classes, and nothing else.

A model is first built as transformers builds it, but on the meta device (``skeleton``): no memory, every
module and index exactly as in ``AutoModelForCausalLM``. Then only the checkpoint tensors a caller
selects (a span's blocks, or the embeddings and head) are loaded into it by transformers' own loading
code (``convert_and_load_state_dict_in_model``, with the model's registered weight conversions), straight
onto the target device and dtype, read lazily from the safetensors files (``load_parts``). That is what makes one generic
adapter work across families: checkpoints whose layout differs from the modules (Mixtral's and
Qwen2-MoE's per-expert weights are fused into one tensor per layer in transformers 5) are converted the
way ``from_pretrained`` converts them, and the rest of the model stays on meta and costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

from shardnet.errors import ModelLoadError
from shardnet.models.checkpoint import Checkpoint

logger = logging.getLogger(__name__)


def skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM transformers would build for ``config`` in ``dtype``, every parameter on meta.

    Buffers stay real (accelerate's ``init_empty_weights(include_buffers=False)``): they are small and
    computed by the modules' constructors (rotary frequencies, Gemma's embedding scale), not stored in
    checkpoints, so this is the one place they get their values.
    """
    with init_empty_weights(include_buffers=False), _quiet_transformers():
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def load_parts(
    model: PreTrainedModel,
    checkpoint: Checkpoint,
    wanted: Callable[[str], bool],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Load every checkpoint tensor whose name ``wanted`` accepts into ``model`` (in place)."""
    keys = [key for key in checkpoint.keys() if wanted(key)]
    if not keys:
        raise ModelLoadError(f"checkpoint {str(checkpoint.folder)!r} has none of the weights asked for")
    load_config = LoadStateDictConfig(
        pretrained_model_name_or_path=str(checkpoint.folder),
        dtype=dtype,
        device_map={"": device},
        weight_mapping=get_model_conversion_mapping(model),
    )
    with _lazy_slices(checkpoint, keys) as state_dict, _quiet_transformers():
        info, _ = convert_and_load_state_dict_in_model(
            model=model, state_dict=state_dict, load_config=load_config
        )
    problems = [*info.error_msgs, *(f"{k}: {v}" for k, v in info.conversion_errors.items())]
    if info.unexpected_keys or problems:
        unexpected = sorted(info.unexpected_keys)[:5]
        raise ModelLoadError(
            f"cannot load {checkpoint.folder}: unexpected weights {unexpected} {problems[:3]}"
        )


def still_on_meta(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that no weight was loaded into."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in named if tensor.is_meta]


@contextlib.contextmanager
def _lazy_slices(checkpoint: Checkpoint, keys: list[str]) -> Iterator[dict]:
    """{key: safetensors slice}: nothing is read until transformers materializes a tensor."""
    by_file: dict = {}
    for key in keys:
        by_file.setdefault(checkpoint.file_of(key), []).append(key)
    with contextlib.ExitStack() as stack:
        slices = {}
        for file, file_keys in by_file.items():
            handle = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            slices.update({key: handle.get_slice(key) for key in file_keys})
        yield slices


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" progress bar or missing-weights report: most of the model is left out on purpose."""
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
