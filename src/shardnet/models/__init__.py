"""Per-architecture adapters and checkpoint reading. Importing this registers every adapter."""

from shardnet.models import decoder  # noqa: F401  (registers an adapter per architecture family)
from shardnet.models.base import (
    ClientHead,
    ModelAdapter,
    SpanInputs,
    SpanModule,
    adapter_for,
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
    "derive_model_id",
    "load_config",
    "supported_model_types",
    "validate_model_id",
]
