"""Server-side LoRA adapters: ``shardnet serve --adapters DIR [DIR ...]`` loads PEFT LoRA folders into the
span (adapter name = folder name), announces their names, and runs each request with the one it names.

PEFT's own layers do the work: ``peft.inject_adapter_in_model`` wraps the span's target linear layers,
and each folder's weights (``adapter_model.safetensors``; no pickle) are loaded into them, keys mapped
from the full model's block indices to the span's. Before each forward pass the compute thread makes
the request's adapter the active one (``active``), or turns adapters off for the base model; passes run
one at a time on that thread, so a pass never sees another's adapter. Sessions with different adapters
are never batched together (server/step_path.py: the batch key holds the adapter), so each session's
output is what it would be alone.

Only what lies in the blocks can be adapted: an adapter that changes the embeddings or the LM head (the
client's parts) is refused at start, as is anything but LoRA.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from shardnet.errors import ConfigError, InvalidRequestError
from shardnet.import_noise import quiet_imports

logger = logging.getLogger(__name__)
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as the DHT record's schema allows
_BLOCK_KEY = re.compile(
    r"(?:^|\.)(?:layers|h)\.(\d+)\.(.+)$"
)  # "...model.layers.7.self_attn.q_proj.lora_A.weight"
_LORA_PART = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)")


class ServerAdapters:
    def __init__(self, blocks: torch.nn.Module, start: int, end: int, folders: list[Path], dtype, device):
        """``blocks``: the span's blocks (indexed from 0 for block ``start``), already loaded."""
        with quiet_imports():  # peft imports torchao and bitsandbytes when installed
            import peft
        self._tuner_layer = peft.tuners.tuners_utils.BaseTunerLayer
        self.names: tuple[str, ...] = ()
        for folder in folders:
            name = folder.name
            if not ADAPTER_NAME.match(name):
                raise ConfigError(
                    f"--adapters {folder}: the folder's name is the adapter's, and {name!r} is not "
                    "one (letters, digits, '_', '.', '-'; at most 64)"
                )
            if name in self.names:
                raise ConfigError(f"--adapters: two folders are named {name!r}")
            config = _lora_config(peft, folder)
            with warnings.catch_warnings():  # peft warns that a second adapter makes several: meant here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                peft.inject_adapter_in_model(config, blocks, adapter_name=name)
            _load_weights(blocks, folder, name, start, end)
            self.names += (name,)
        for param_name, param in blocks.named_parameters():  # the adapters' own weights only
            if ".lora_" in f".{param_name}":
                param.data = param.data.to(device=device, dtype=dtype)
        self._layers = [m for m in blocks.modules() if isinstance(m, self._tuner_layer)]
        self._active: str | None = None  # None: not set yet
        logger.info("adapters loaded for blocks %d:%d: %s", start, end, ", ".join(self.names) or "none")

    def check(self, name: str) -> None:
        if name and name not in self.names:
            held = ", ".join(self.names) or "none"
            raise InvalidRequestError(f"adapter {name!r} is not served here (this server's adapters: {held})")

    @contextlib.contextmanager
    def active(self, name: str) -> Iterator[None]:
        """Run the body (on the compute thread) with adapter ``name`` active; "" = the base model."""
        if name != self._active:
            for layer in self._layers:
                if name:
                    layer.enable_adapters(True)
                    layer.set_adapter(name)
                else:
                    layer.enable_adapters(False)
            self._active = name
        yield


def _lora_config(peft, folder: Path):
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"--adapters {folder}: no adapter_config.json there (a PEFT adapter folder)")
    config = peft.PeftConfig.from_pretrained(str(folder))
    if config.peft_type != peft.PeftType.LORA:
        raise ConfigError(f"--adapters {folder}: a {config.peft_type} adapter; only LoRA is served")
    config = peft.LoraConfig.from_pretrained(str(folder))
    outside = set(config.modules_to_save or []) | {
        m
        for m in (config.target_modules if isinstance(config.target_modules, (list, set)) else [])
        if m in ("lm_head", "embed_tokens", "wte", "wpe")
    }
    if outside:
        raise ConfigError(
            f"--adapters {folder}: it changes {', '.join(sorted(outside))}, outside the blocks (the client's parts)"
        )
    return config


def _load_weights(blocks: torch.nn.Module, folder: Path, name: str, start: int, end: int) -> None:
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise ConfigError(
            f"--adapters {folder}: no adapter_model.safetensors there (pickled weights are refused)"
        )
    own = blocks.state_dict()
    mine: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(path).items():
        found = _BLOCK_KEY.search(key)
        if found is None:
            raise ConfigError(
                f"--adapters {folder}: weight {key} is not in a block; only blocks can be adapted"
            )
        block, rest = int(found.group(1)), found.group(2)
        if not start <= block < end:
            continue  # another server's blocks
        local = (
            f"{block - start}.{_LORA_PART.sub(lambda m: f'.{m.group(1)}.{name}{m.group(2)}', rest, count=1)}"
        )
        if local not in own:
            raise ConfigError(
                f"--adapters {folder}: weight {key} matches nothing in blocks {start}:{end} ({local})"
            )
        mine[local] = tensor
    missing = [k for k in own if f".{name}." in k and k not in mine]
    if missing:
        raise ConfigError(
            f"--adapters {folder}: no weights for {len(missing)} of its layers here, e.g. {missing[0]}"
        )
    blocks.load_state_dict(mine, strict=False)
