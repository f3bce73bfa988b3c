"""Per-architecture adapters and checkpoint reading.

Importing this is light (a model folder's config, ids, the adapter contract): transformers' modeling
code loads only when an adapter is first asked for (``adapter_for``), so commands that fail on a flag or
a model folder, and ``shardnet status``, answer in about a second instead of five.
"""

from shardnet.models.base import (
    ClientHead,
    ModelAdapter,
    SpanInputs,
    SpanModule,
    adapter_for,
    block_count,
    supported_model_types,
)
from shardnet.models.checkpoint import Checkpoint, derive_model_id, load_config, validate_model_id

__all__ = [
    "Checkpoint",
    "ClientHead",
    "ModelAdapter",
    "SpanInputs",
    "SpanModule",
    "adapter_for",
    "block_count",
    "derive_model_id",
    "load_config",
    "supported_model_types",
    "validate_model_id",
]
