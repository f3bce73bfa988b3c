"""``generate()`` on the swarm: transformers' own loop over a ``RemoteCache`` that stands for the servers'
KV caches (``SwarmGeneration``, mixed into ``ShardedModel``), and the checks of what it is given."""

from __future__ import annotations

import torch
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from shardnet.client.remote_cache import RemoteCache
from shardnet.devices import HOST
from shardnet.errors import GenerationError
from shardnet.models import hf_compat


class SwarmGeneration:
    """What ``ShardedModel`` adds to transformers' ``GenerationMixin``."""

    def prepare_remote_cache(self, cache, generation_config: GenerationConfig, max_cache_length: int) -> None:
        """generate() runs on a RemoteCache sized for this generation (the servers reserve it)."""
        require_remote(cache)
        if generation_config.cache_implementation is not None:
            raise GenerationError("cache_implementation does not apply: the KV caches live on the servers")
        cache.reserve(max_cache_length + 1)

    # ---- generate ----

    def generate(
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
    ):
        """transformers' ``generate()``, on a RemoteCache of its own (freed when it returns).

        Inside ``inference_session`` a call continues the conversation: ``input_ids`` are the new tokens
        only, and the result is them followed by the new tokens.
        """
        if inputs is None and "input_ids" in kwargs:
            inputs = kwargs.pop("input_ids")
        if isinstance(inputs, list | tuple):
            inputs = as_ids(inputs)
        given = hf_compat.pop_cache(kwargs)  # `cache=` or `past_key_values=`, whichever the caller used
        conversation = self._conversation.get()
        if conversation is not None and given is None and inputs is not None:
            mask = kwargs.pop("attention_mask", None)
            device = inputs.device
            inputs = as_ids(inputs)
            with hf_compat.upstream_noise_dropped(assisted=kwargs.get("assistant_model") is not None):
                out = conversation.generate(super().generate, generation_config, inputs, mask, kwargs)
            self.last_route = conversation.route
            return to_device(out, device)
        use_cache = kwargs.get("use_cache", (generation_config or self.generation_config).use_cache)
        quiet = hf_compat.upstream_noise_dropped(assisted=kwargs.get("assistant_model") is not None)
        if given is not None or use_cache is False:
            with quiet:
                return super().generate(inputs, generation_config, **hf_compat.cache_kwargs(given), **kwargs)
        cache = RemoteCache(self._open_chain)
        try:
            with quiet:
                out = super().generate(inputs, generation_config, **hf_compat.cache_kwargs(cache), **kwargs)
        except BaseException:
            cache.close()
            raise
        self.last_route = cache.route
        if not (isinstance(out, ModelOutput) and hf_compat.cache_in(out) is cache):
            cache.close()  # returned only with return_dict_in_generate: then it lives until dropped
        return out


def require_remote(cache) -> None:
    if cache is not None and not isinstance(cache, RemoteCache):
        raise GenerationError(
            f"the cache must be a RemoteCache (the servers' caches), not {type(cache).__name__}"
        )


def to_device(out, device: torch.device):
    """Sequences back on the device the caller's ids came on."""
    if isinstance(out, ModelOutput):
        out.sequences = out.sequences.to(device)
        return out
    return out.to(device)


def as_ids(input_ids) -> torch.Tensor:
    if input_ids is None:
        raise GenerationError("input_ids is required")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise GenerationError(
            f"input_ids must be [batch, seq] integer token ids, got {list(input_ids.shape)} {input_ids.dtype}"
        )
    return input_ids.to(HOST, torch.long)  # token bookkeeping and the wire live on the host
