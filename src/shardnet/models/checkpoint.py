"""Read a Hugging Face model folder: its config, and only the weight tensors a caller names.

Works with a single ``model.safetensors`` or a sharded checkpoint with ``model.safetensors.index.json``,
as ``save_pretrained`` writes them. Tensors are read one by one with safetensors' lazy reader, so the
other blocks, embeddings or LM head are never materialized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from shardnet.errors import ModelLoadError
from shardnet.model_folder import check_model_folder

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Config fields that do not change the model's numbers; left out of the model id.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "use_cache",
}


def load_config(path: str | Path) -> PretrainedConfig:
    """The model's transformers config; ModelLoadError if the folder is missing or not a model."""
    folder = check_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(f"cannot read config of {str(folder)!r}: {exc}") from exc
    return config  # the attention implementation is transformers' default for the model class


def derive_model_id(config: PretrainedConfig) -> str:
    """A DHT prefix that is the same for every copy of this model: model type + hash of its config."""
    fields = {
        k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    model_type = re.sub(r"[^a-z0-9]", "", str(config.model_type).lower()) or "model"
    return f"{model_type}_{digest}"


def validate_model_id(model_id: str) -> str:
    """Model ids become DHT key prefixes: letters, digits and underscores, 1-64 characters."""
    if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", model_id):
        raise ModelLoadError(f"model id {model_id!r} must be 1-64 letters, digits or underscores")
    return model_id


class Checkpoint:
    """Index of a folder's safetensors files: which file holds which tensor name."""

    def __init__(self, path: str | Path):
        self.folder = Path(path)
        self._file_for_key = self._index()

    def _index(self) -> dict[str, Path]:
        index_path = self.folder / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ModelLoadError(f"{index_path} is not a safetensors index: {exc}") from exc
            return {key: self.folder / name for key, name in weight_map.items()}
        single = self.folder / SINGLE_FILE
        if not single.is_file():
            raise ModelLoadError(
                f"model folder {str(self.folder)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}"
            )
        with safe_open(single, framework="pt") as handle:
            return {key: single for key in handle.keys()}

    def keys(self) -> list[str]:
        return list(self._file_for_key)

    def has(self, key: str) -> bool:
        return key in self._file_for_key

    def file_of(self, key: str) -> Path:
        """The safetensors file that holds ``key``."""
        if key not in self._file_for_key:
            raise ModelLoadError(f"checkpoint {str(self.folder)!r} has no tensor {key!r}")
        return self._file_for_key[key]

    def read(
        self, keys: Iterable[str], dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Read only ``keys``, file by file, straight onto ``device`` (safetensors copies each tensor
        there from the mapped file, never through a CPU copy of the whole span); cast floating tensors to
        ``dtype`` one tensor at a time."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self._file_for_key:
                raise ModelLoadError(f"checkpoint {str(self.folder)!r} has no tensor {key!r}")
            by_file.setdefault(self._file_for_key[key], []).append(key)
        tensors: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt", device=str(device)) as handle:
                for key in file_keys:
                    tensor = handle.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    tensors[key] = tensor
        return tensors

    def read_prefixed(
        self,
        prefix_for: Callable[[str], str | None],
        dtype: torch.dtype | None,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Read every tensor whose name ``prefix_for`` maps to a new name (None = skip), under that name."""
        renames = {key: new for key in self._file_for_key if (new := prefix_for(key)) is not None}
        loaded = self.read(renames, dtype, device)
        return {renames[key]: tensor for key, tensor in loaded.items()}
