"""generate() in named phases: resolve kwargs, prefill, decode one token at a time, stop.

Kwargs mean what they mean in transformers: they update the model's GenerationConfig, and sampling
uses transformers' own logits processors in transformers' order, so a fixed seed samples the same
tokens as a local ``model.generate``.
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from shardnet.client.conversation import Conversation
from shardnet.devices import HOST  # tokens are chosen on the host, whatever device the LM head is on
from shardnet.errors import GenerationError

logger = logging.getLogger(__name__)

# GenerationConfig fields that would change the result but that this generate() does not implement yet:
# refuse them rather than silently ignore them. Value = the value that means "off".
_UNSUPPORTED = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "no_repeat_ngram_size": None,
    "bad_words_ids": None,
    "min_new_tokens": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "guidance_scale": None,
    "return_dict_in_generate": False,
    "penalty_alpha": None,
}


def resolve_config(
    base: GenerationConfig, override: GenerationConfig | None, kwargs: dict
) -> GenerationConfig:
    """The GenerationConfig a call means: the model's (or the one passed), updated by kwargs."""
    config = copy.deepcopy(override if override is not None else base)
    unused = config.update(**kwargs)
    if unused:
        raise GenerationError(f"generate() got unknown arguments: {', '.join(sorted(unused))}")
    for name, off in _UNSUPPORTED.items():
        value = getattr(config, name, off)
        if value not in (off, None) and not (name == "min_new_tokens" and value == 0):
            raise GenerationError(f"generate(): {name}={value!r} is not supported by shardnet yet")
    if config.do_sample and config.temperature is not None and config.temperature <= 0:
        raise GenerationError("temperature must be positive when do_sample=True")
    if config.top_p is not None and not 0 < config.top_p <= 1:
        raise GenerationError("top_p must be in (0, 1]")
    if config.top_k is not None and config.top_k < 0:
        raise GenerationError("top_k must be non-negative")
    return config


def logits_processors(config: GenerationConfig, attention_mask: torch.Tensor | None) -> LogitsProcessorList:
    """The processors transformers' generate() would build for these settings, in its order."""
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        ignore = (attention_mask != 0).int().argmax(dim=1) if attention_mask is not None else None
        processors.append(
            RepetitionPenaltyLogitsProcessor(config.repetition_penalty, prompt_ignore_length=ignore)
        )
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    return processors


def _eos_ids(config: GenerationConfig) -> torch.Tensor | None:
    eos = config.eos_token_id
    if eos is None:
        return None
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)


def new_token_budget(config: GenerationConfig, total_length: int) -> int:
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    return max(int(config.max_length or 20) - total_length, 0)


def prefill(
    conversation: Conversation, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Send the prompt (after any token still pending from a previous call); logits of the last position."""
    conversation.append(input_ids, attention_mask)
    return conversation.flush(last_only=True)[:, -1].to(HOST, torch.float32)  # [batch, vocab]


def decode_one_token(conversation: Conversation, token: torch.Tensor) -> torch.Tensor:
    """Send one token per row; logits [batch, vocab] of the next position."""
    conversation.append(token[:, None])
    return conversation.flush(last_only=True)[:, -1].to(HOST, torch.float32)


def sample(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    if do_sample:
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    return torch.argmax(scores, dim=-1)


def decode_n_tokens(
    conversation: Conversation,
    logits: torch.Tensor,
    config: GenerationConfig,
    processors: LogitsProcessorList,
    max_new_tokens: int,
    streamer,
) -> torch.Tensor:
    """Pick up to max_new_tokens tokens; the last one stays pending in the conversation."""
    batch = logits.shape[0]
    eos = _eos_ids(config)
    pad = config.pad_token_id
    if eos is not None and pad is None:
        pad = int(eos[0])
    unfinished = torch.ones(batch, dtype=torch.bool)
    generated = []
    for index in range(max_new_tokens):
        scores = processors(conversation.ids, logits)  # every token so far: what repetition penalty sees
        token = sample(scores, bool(config.do_sample))  # [batch]
        if eos is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad))
        generated.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if eos is not None:
            unfinished &= ~torch.isin(token, eos)
        if index == max_new_tokens - 1 or not bool(unfinished.any()):
            conversation.append(token[:, None])  # pending: the servers see it when the session continues
            break
        logits = decode_one_token(conversation, token)
    if not generated:
        return torch.empty(batch, 0, dtype=torch.long)
    return torch.stack(generated, dim=1)  # [batch, new]


def generate(
    conversation: Conversation,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    streamer=None,
) -> torch.Tensor:
    """Returns ``input_ids`` followed by the new tokens, like transformers."""
    if streamer is not None:
        streamer.put(input_ids.cpu())
    full_mask = None
    if attention_mask is not None:
        history = conversation.mask if conversation.batch_size is not None else None
        full_mask = (
            attention_mask if history is None else torch.cat([history, attention_mask.to(torch.long)], dim=1)
        )
    processors = logits_processors(config, full_mask)
    budget = new_token_budget(config, conversation.ids.shape[1] + input_ids.shape[1])
    if budget == 0:
        if streamer is not None:
            streamer.end()
        return input_ids
    logits = prefill(conversation, input_ids, attention_mask)
    new_tokens = decode_n_tokens(conversation, logits, config, processors, budget, streamer)
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, new_tokens], dim=1)
