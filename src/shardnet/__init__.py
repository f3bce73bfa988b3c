"""shardnet: run large language models split across volunteer machines.

``from shardnet import ShardedModel`` is the client entry point; importing shardnet configures nothing
and loads the client only when ``ShardedModel`` is first used.
"""

from __future__ import annotations

from shardnet.version import __version__

__all__ = ["ShardedModel", "__version__"]


def __getattr__(name: str):
    if name == "ShardedModel":
        from shardnet.import_noise import quiet_imports

        with quiet_imports():  # transformers imports torchao, which warns on a CPU-only torch
            from shardnet.client.model import ShardedModel

        return ShardedModel
    raise AttributeError(f"module 'shardnet' has no attribute {name!r}")
