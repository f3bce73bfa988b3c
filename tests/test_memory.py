"""A server holds only its span: RSS grows with the span's weights, not with the model."""

from __future__ import annotations

import logging

import psutil
import pytest

from shardnet.launch import LocalSwarm

from .conftest import make_llama

logger = logging.getLogger(__name__)
HIDDEN, INTERMEDIATE, VOCAB, BLOCKS = 512, 2048, 32000, 16
BLOCK_BYTES = 4 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN)  # float32
EMBEDDING_BYTES = 4 * 2 * VOCAB * HIDDEN  # untied embeddings + LM head, never on a server


@pytest.fixture(scope="module")
def llama_16(tmp_path_factory):
    return make_llama(
        tmp_path_factory.mktemp("llama16"),
        num_hidden_layers=BLOCKS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=VOCAB,
    )


def _server_rss(model_path, span, logs) -> tuple[int, list[str]]:
    """The server's RSS, and the names of the processes under it."""
    with LocalSwarm(model_path, [span], log_dir=logs, torch_threads=1) as swarm:
        server = psutil.Process(swarm.servers[0].pid)
        return server.memory_info().rss, [child.name() for child in server.children(recursive=True)]


def test_rss_grows_with_span_not_model(llama_16, tmp_path):
    small, children = _server_rss(llama_16, (0, 2), tmp_path)
    full, _ = _server_rss(llama_16, (0, BLOCKS), tmp_path)
    # Only the DHT node's process and its p2pd: no torch_shm_manager (shardnet/process_env.py).
    assert "torch_shm_manager" not in children and "p2pd" in children, children
    mib = 1 << 20
    logger.info(
        "RSS blocks 0:2 = %.0f MiB, blocks 0:16 = %.0f MiB; one block = %.1f MiB, embeddings+head = %.0f MiB",
        small / mib,
        full / mib,
        BLOCK_BYTES / mib,
        EMBEDDING_BYTES / mib,
    )
    # The 14 extra blocks account for the difference (allocator slack either way)...
    assert 0.8 * 14 * BLOCK_BYTES <= full - small <= 1.25 * 14 * BLOCK_BYTES
    # ...and even the full-span server never loads the embeddings or LM head: the runtime (torch,
    # transformers, grpc, hivemind client) is what remains besides the blocks.
    runtime = full - BLOCKS * BLOCK_BYTES
    assert small < runtime + 2 * BLOCK_BYTES + EMBEDDING_BYTES / 2
