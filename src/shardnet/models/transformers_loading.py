"""Load named parts of a checkpoint into transformers' own model classes, and nothing else.

A model is first built as transformers builds it, but on the meta device (``hf_compat.skeleton``): no memory, every
module and index exactly as in ``AutoModelForCausalLM``. Then only the checkpoint tensors a caller
selects (a span's blocks, or the embeddings and head) are loaded into it by transformers' own loading
code (``hf_compat.load_state_dict``, with the model's registered weight conversions), straight
onto the target device and dtype, read lazily from the safetensors files (``load_parts``). That is what makes one generic
adapter work across families: checkpoints whose layout differs from the modules (Mixtral's and
Qwen2-MoE's per-expert weights are fused into one tensor per layer in transformers 5) are converted the
way ``from_pretrained`` converts them, and the rest of the model stays on meta and costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from shardnet.errors import ModelLoadError
from shardnet.models import hf_compat
from shardnet.models.checkpoint import Checkpoint

if TYPE_CHECKING:  # transformers' modeling code loads where a model is built (hf_compat)
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


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
    with _lazy_slices(checkpoint, keys) as state_dict:
        unexpected, problems = hf_compat.load_state_dict(
            model, state_dict, str(checkpoint.folder), dtype, device
        )
    if unexpected or problems:
        raise ModelLoadError(
            f"cannot load {checkpoint.folder}: unexpected weights {unexpected[:5]} {problems[:3]}"
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
