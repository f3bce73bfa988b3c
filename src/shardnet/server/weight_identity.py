"""Weight identity: a short digest of each block's weights, computed once at load and announced.

The model id is a hash of the config alone, so a server whose weights are corrupt (a bad download, a
wrong conversion) or altered on purpose announces the same model and span as every other. With a
digest per block in each record, ``shardnet status`` compares the holders of a block
(``client/swarm_status.py``): a server whose digest differs from what most holders of the same block,
dtype and quantization announce is shown as such. A digest is what the server says of itself, so it tells an honest mistake, not a liar: checking
results is what catches those.

The digest of a block is BLAKE2b (4 bytes, 8 hex digits: enough to tell two different sets of weights
apart by accident, and short, since every record is copied under each block key) over its tensors in
name order: each name, dtype, shape and raw bytes, as loaded (after the cast to the server's dtype and
any quantization), so honest servers of the same dtype and quantization agree bit for bit.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)
DIGEST_BYTES = 4


def block_digest(block: nn.Module) -> str:
    """The hex digest of one block's parameters and buffers."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for name, tensor in sorted(block.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy())  # read in place: no copy of the bytes
    return digest.hexdigest()


def span_digests(blocks: nn.ModuleList) -> list[str]:
    """One digest per block of the span, in block order; none where a block's tensors have no plain bytes
    to read (a quantization's own tensor types): such a server announces no digests."""
    try:
        return [block_digest(block) for block in blocks]
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        logger.info("no weight digests announced: %s", exc)
        return []
