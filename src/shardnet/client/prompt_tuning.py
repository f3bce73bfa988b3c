"""Prompt tuning, as Petals offers it: trainable prompts that live on the client, trained through the
swarm (``client/backward.py``) while every weight of the model stays as it is.

- ``ptune``: ``pre_seq_len`` trainable embeddings are put before the input's token embeddings (with the
  first positions, and ones in the padding mask); the model's outputs at those positions are dropped, so
  logits and loss cover the input's positions only.
- ``deep_ptune``: the same, and every block also adds prompts of its own to the hidden states of those
  first positions before it runs. They travel with each request (``ForwardRequest.prompts``: the span's
  blocks' share), and the servers return their gradients with the input's (``BackwardResponse``).

The model's own parameters (embeddings, norm, LM head) are frozen in a tuning mode; the prompts are the
model's only trainable parameters (``model.prompts``).
"""

from __future__ import annotations

import torch
from torch import nn

from shardnet.errors import ConfigError

TUNING_MODES = ("ptune", "deep_ptune")


class PromptTuning(nn.Module):
    def __init__(self, mode: str, pre_seq_len: int, hidden_size: int, num_blocks: int, dtype: torch.dtype):
        super().__init__()
        if mode not in TUNING_MODES:
            raise ConfigError(f"tuning_mode must be one of {', '.join(TUNING_MODES)} or None, got {mode!r}")
        if not isinstance(pre_seq_len, int) or pre_seq_len < 1:
            raise ConfigError(
                f"pre_seq_len must be a positive number of prompt positions, got {pre_seq_len!r}"
            )
        self.mode = mode
        self.pre_seq_len = pre_seq_len
        self.num_blocks = num_blocks
        self.prompt_embeddings = nn.Embedding(pre_seq_len, hidden_size, dtype=dtype)  # [pre, hidden]
        self.intermediate_prompt_embeddings = (
            nn.Embedding(pre_seq_len, num_blocks * hidden_size, dtype=dtype) if mode == "deep_ptune" else None
        )  # [pre, blocks x hidden]; starts at zero: before training, deep prompts change nothing
        if self.intermediate_prompt_embeddings is not None:
            nn.init.zeros_(self.intermediate_prompt_embeddings.weight)

    def prepend(
        self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Token embeddings [batch, seq, hidden] with the prompts before them, and the padding mask and
        position ids extended over the prompts (the prompts take positions 0 .. pre_seq_len - 1)."""
        batch, pre = tokens.shape[0], self.pre_seq_len
        prompts = self.prompt_embeddings.weight.to(tokens.device, tokens.dtype)
        embeds = torch.cat(
            [prompts.unsqueeze(0).expand(batch, -1, -1), tokens], dim=1
        )  # [batch, pre+seq, hidden]
        if mask is not None:
            mask = torch.cat([torch.ones(batch, pre, dtype=mask.dtype, device=mask.device), mask], dim=1)
        if positions is not None:
            first = torch.arange(pre, device=positions.device).unsqueeze(0).expand(batch, -1)
            positions = torch.cat([first, positions + pre], dim=1)
        return embeds, mask, positions

    def deep_prompts(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Every block's prompts, [num_blocks, pre_seq_len, hidden], or None in ``ptune``."""
        if self.intermediate_prompt_embeddings is None:
            return None
        weight = self.intermediate_prompt_embeddings.weight  # [pre, blocks x hidden]
        return weight.view(self.pre_seq_len, self.num_blocks, -1).transpose(0, 1).to(dtype)

    def strip(self, hidden: torch.Tensor) -> torch.Tensor:
        """The outputs of the input's own positions: [batch, pre+seq, ...] -> [batch, seq, ...]."""
        return hidden[:, self.pre_seq_len :].contiguous()
