"""The adapter contract: everything the server and client need to know about one architecture."""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from shardnet.errors import ModelLoadError
from shardnet.models.checkpoint import Checkpoint

logger = logging.getLogger(__name__)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class SpanInputs:
    """What one call of a span needs besides the hidden states."""

    attention_mask: torch.Tensor | None  # [batch, past + new] 0/1 padding mask of every position, or None
    position_ids: torch.Tensor  # [batch, new] rotary positions of the new positions
    # [blocks, k, hidden] deep prompt tuning: before block i of the run, prompts[i] is added to the first k
    # new positions of every row; None without (every session step, every plain forward)
    prompts: torch.Tensor | None = None
    adapter: str = ""  # the LoRA adapter to run the blocks with (server/adapters.py); "" = the base model


class SpanModule(nn.Module, ABC):
    """Blocks ``start:end`` of a model, runnable over any contiguous sub-range with a KV cache."""

    start: int
    end: int

    @abstractmethod
    def new_cache(self) -> object:
        """A fresh, empty KV cache for one session over this span."""

    @abstractmethod
    def run(
        self, hidden_states: torch.Tensor, inputs: SpanInputs, cache: object | None, start: int, end: int
    ) -> torch.Tensor:
        """Run blocks ``start:end`` (absolute indices) over ``hidden_states`` [batch, new, hidden]."""

    def input_gradient(
        self,
        hidden_states: torch.Tensor,
        inputs: SpanInputs,
        grad_outputs: torch.Tensor,
        start: int,
        end: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of a loss with respect to ``hidden_states`` [batch, seq, hidden] and to the deep
        prompts (``inputs.prompts``, or None), given its gradient with respect to blocks ``start:end``'s
        output over full sequences (no cache). The blocks' forward runs again with autograd; the weights
        get no gradient and never change."""
        raise NotImplementedError(f"{type(self).__name__} cannot run backward")

    @abstractmethod
    def crop_cache(self, cache: object, start: int, end: int, keep: int) -> None:
        """Keep only the first ``keep`` positions of blocks ``start:end`` in ``cache`` (a rollback)."""

    @abstractmethod
    def reorder_cache(self, cache: object, start: int, end: int, rows: torch.Tensor) -> None:
        """Row i of blocks ``start:end`` in ``cache`` becomes old row ``rows[i]`` ([batch] int64)."""

    def export_cache(
        self, cache: object, start: int, end: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Blocks ``start:end`` of ``cache`` as (keys, values, positions seen) per block, for a hand-off
        to another server (``import_cache`` there). Keys and values: [batch, kv heads, kept, head dim]."""
        raise NotImplementedError(f"{type(self).__name__} cannot hand its sessions over")

    def import_cache(
        self, cache: object, start: int, end: int, layers: list[tuple[torch.Tensor, torch.Tensor, int]]
    ) -> None:
        """Fill blocks ``start:end`` of a fresh ``new_cache()`` with what ``export_cache`` gave elsewhere."""
        raise NotImplementedError(f"{type(self).__name__} cannot adopt sessions")

    def stack_caches(
        self, caches: list[object], batch_sizes: list[int], start: int, end: int, frame: int
    ) -> object | None:
        """One cache standing for several sessions' caches of blocks ``start:end`` (``batch_sizes[i]`` rows
        each), for one forward pass over their rows stacked in order. ``frame``: the most positions
        any of them holds; each session's positions are right-aligned in it (the caller's padding mask
        hides the rest). Running it appends every session's new position to its own cache. None: this
        span cannot batch sessions, and they run one by one."""
        return None


class ClientHead(nn.Module, ABC):
    """The small parts a client keeps: token embeddings, final norm and LM head, on one device."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the head computes; ``embed`` and ``logits`` take inputs from any device."""

    @abstractmethod
    def embed(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[batch, seq] token ids (or their embeddings, ``inputs_embeds``) at [batch, seq] positions ->
        [batch, seq, hidden] hidden states entering the first block.

        Positions matter only to models with learned absolute position embeddings (gpt2)."""

    @abstractmethod
    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] final hidden states -> [batch, seq, vocab] logits."""


class ModelAdapter(ABC):
    """Per-architecture glue, registered by transformers' ``model_type``."""

    model_types: tuple[str, ...] = ()

    @abstractmethod
    def load_span(
        self,
        checkpoint: Checkpoint,
        config: PretrainedConfig,
        start: int,
        end: int,
        dtype: torch.dtype,
        device: torch.device = CPU,
    ) -> SpanModule:
        """Build blocks ``start:end`` on ``device`` and load only their weights, straight onto it."""

    @abstractmethod
    def load_head(
        self, checkpoint: Checkpoint, config: PretrainedConfig, dtype: torch.dtype, device: torch.device = CPU
    ) -> ClientHead:
        """Build the client-side parts on ``device`` and load only their weights, straight onto it."""


def block_count(config: PretrainedConfig) -> int:
    """Transformer blocks in the model (every architecture's config names them num_hidden_layers)."""
    return int(config.num_hidden_layers)


_REGISTRY: dict[str, ModelAdapter] = {}


def register(adapter: ModelAdapter) -> ModelAdapter:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def _register_adapters() -> None:
    """The adapters register themselves when their module is imported (the first time only)."""
    importlib.import_module("shardnet.models.decoder")


def adapter_for(config: PretrainedConfig) -> ModelAdapter:
    _register_adapters()
    adapter = _REGISTRY.get(config.model_type)
    if adapter is None:
        raise ModelLoadError(
            f"architecture {config.model_type!r} is not supported yet; supported: {', '.join(sorted(_REGISTRY))}"
        )
    return adapter


def supported_model_types() -> list[str]:
    _register_adapters()
    return sorted(_REGISTRY)


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into a module built on the meta device; every parameter must be present."""
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(f"{what}: missing weights {missing[:5]} / unexpected weights {unexpected[:5]}")
