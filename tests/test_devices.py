"""--device and --dtype: parsed, resolved against this machine, and checked against its memory before any
weight is loaded. Runs without a GPU: CUDA and MPS are refused here with one line, and the resolution
rules for GPUs are checked with torch's device queries stood in for."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from transformers import LlamaConfig

from shardnet import ShardedModel, devices
from shardnet.devices import parse_device, resolve_device, resolve_dtype
from shardnet.errors import ConfigError, ModelLoadError
from shardnet.models import Checkpoint, SpanInputs, adapter_for, load_config
from shardnet.models.footprint import block_of, block_weight_bytes, kv_bytes_per_token
from shardnet.server.config import ServerConfig
from shardnet.server.fit import SpanFootprint, check_fit

GIB = 1 << 30
HAS_CUDA = torch.cuda.is_available()
HAS_MPS = torch.backends.mps.is_available()


# ---- parsing and resolution ----


@pytest.mark.parametrize(
    ("text", "name"),
    [("auto", "auto"), ("CPU", "cpu"), (" cuda ", "cuda"), ("cuda:3", "cuda:3"), ("mps", "mps")],
)
def test_parse_device_accepts_the_documented_forms(text, name):
    assert parse_device(text) == name


@pytest.mark.parametrize("text", ["bogus", "gpu", "cuda:", "cuda:x", "cuda1", "", "cpu:0"])
def test_parse_device_refuses_anything_else(text):
    with pytest.raises(ConfigError, match="--device"):
        parse_device(text)


def test_cpu_and_auto_without_a_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if not HAS_CUDA:
        assert resolve_device("auto") == torch.device("cpu")


def _fake_cuda(monkeypatch, count: int, major: int = 8) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.version, "hip", None)


def test_auto_takes_the_first_cuda_gpu_when_there_is_one(monkeypatch):
    _fake_cuda(monkeypatch, count=2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_cuda_index_past_the_last_gpu_is_refused(monkeypatch):
    _fake_cuda(monkeypatch, count=2)
    with pytest.raises(
        ConfigError, match=r"--device cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"
    ):
        resolve_device("cuda:2")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.skipif(HAS_MPS, reason="this machine has MPS")
def test_mps_without_mps_is_refused():
    with pytest.raises(ConfigError, match="MPS is not available"):
        resolve_device("mps")


# ---- the client's device (from_pretrained(device=...)) ----

_NO_DHT_HERE = ["/ip4/127.0.0.1/tcp/9/p2p/QmNotARealPeerButTheCheckComesFirstAnyway1111111"]


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_client_on_cuda_without_cuda_is_refused_before_joining(llama_untied):
    with pytest.raises(ConfigError, match=r"device='cuda': CUDA is not available .*use device='cpu' or auto"):
        ShardedModel.from_pretrained(llama_untied, _NO_DHT_HERE, device="cuda")


def test_client_device_must_be_a_device(llama_untied):
    with pytest.raises(
        ConfigError, match=r"device='gpu0' is not a device: use auto, cpu, cuda, cuda:N or mps"
    ):
        ShardedModel.from_pretrained(llama_untied, _NO_DHT_HERE, device="gpu0")


def test_client_head_computes_on_its_device_from_host_inputs(llama_untied):
    """The head takes ids and hidden states from the host (the wire) and computes on its own device."""
    config = load_config(llama_untied)
    head = adapter_for(config).load_head(
        Checkpoint(llama_untied), config, torch.float32, resolve_device("auto")
    )
    ids = torch.tensor([[5, 6, 7]])
    hidden = head.embed(ids, torch.arange(3)[None])
    assert hidden.device == head.device == resolve_device("auto")
    assert head.logits(hidden.cpu()).device == head.device


def test_dtype_auto_by_device(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    _fake_cuda(monkeypatch, count=1, major=8)  # Ampere and later compute bfloat16 natively
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    _fake_cuda(monkeypatch, count=1, major=7)  # Volta/Turing: float16
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16
    monkeypatch.setattr(torch.version, "hip", "6.0")  # every ROCm GPU torch supports does bfloat16
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16


def test_an_explicit_dtype_wins(monkeypatch):
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    _fake_cuda(monkeypatch, count=1, major=8)
    assert resolve_dtype("float32", torch.device("cuda", 0)) == torch.float32


def test_server_config_needs_exactly_one_way_to_place_the_span(tmp_path):
    with pytest.raises(ConfigError, match="--num-blocks N .* or --blocks START:END"):
        ServerConfig(model_path=tmp_path)
    with pytest.raises(ConfigError, match="exclude each other"):
        ServerConfig(model_path=tmp_path, blocks=(0, 2), num_blocks=2)
    with pytest.raises(ConfigError, match="--device"):
        ServerConfig(model_path=tmp_path, blocks=(0, 2), device="gpu")
    with pytest.raises(ConfigError, match="--dtype"):
        ServerConfig(model_path=tmp_path, blocks=(0, 2), dtype="int8")
    assert (
        ServerConfig(model_path=tmp_path, num_blocks=3).device,
        ServerConfig(model_path=tmp_path, num_blocks=3).dtype,
    ) == ("auto", "auto")


# ---- footprint and fit ----


def test_block_keys_of_the_usual_layouts():
    assert block_of("model.layers.7.mlp.up_proj.weight") == 7
    assert block_of("transformer.h.11.attn.c_attn.weight") == 11
    assert block_of("gpt_neox.layers.3.attention.dense.bias") == 3
    assert block_of("model.embed_tokens.weight") is None
    assert block_of("lm_head.weight") is None


@pytest.mark.parametrize("model", ["llama_untied", "llama_tied"])
def test_footprint_matches_what_a_loaded_span_holds(model, request):
    """Weight bytes from the headers equal the loaded span's parameters (single file and sharded), and
    the KV bytes per token equal what a real cache holds after a prefill."""
    path = request.getfixturevalue(model)
    config, checkpoint = load_config(path), Checkpoint(path)
    dtype = torch.bfloat16  # the checkpoint is float32: the estimate is in the compute dtype
    per_block = block_weight_bytes(checkpoint, 0, 6, dtype)
    span = adapter_for(config).load_span(checkpoint, config, 1, 4, dtype)
    loaded = sum(p.numel() * p.element_size() for p in span.parameters())
    assert sum(per_block[1:4]) == loaded == sum(block_weight_bytes(checkpoint, 1, 4, dtype))

    cache, tokens = span.new_cache(), 5
    hidden = torch.zeros(1, tokens, config.hidden_size, dtype=dtype)  # [batch, seq, hidden]
    span.run(hidden, SpanInputs(None, torch.arange(tokens).unsqueeze(0)), cache, 1, 4)
    filled = [layer for layer in cache.layers if layer.keys is not None]  # the model's cache: the span's only
    assert len(filled) == 3
    cached = sum(t.numel() * t.element_size() for layer in filled for t in (layer.keys, layer.values))
    assert cached == tokens * kv_bytes_per_token(config, 3, dtype)


def test_a_span_needs_only_its_own_shards(llama_tied, tmp_path):
    """A sharded checkpoint of which only some shards are here (downloaded for one span): the span's
    weights are counted from its shards, and asking about a block whose shard is absent says so."""
    index = json.loads((llama_tied / "model.safetensors.index.json").read_text())
    keep = {name for key, name in index["weight_map"].items() if block_of(key) in (2, 3)}
    for file in llama_tied.iterdir():
        if file.suffix != ".safetensors" or file.name in keep:
            (tmp_path / file.name).symlink_to(file)
    checkpoint, dtype = Checkpoint(tmp_path), torch.float32
    assert block_weight_bytes(checkpoint, 2, 4, dtype) == block_weight_bytes(
        Checkpoint(llama_tied), 2, 4, dtype
    )
    with pytest.raises(ModelLoadError, match="safetensors header"):
        block_weight_bytes(checkpoint, 0, 6, dtype)


def test_fit_check_with_numbers():
    device = torch.device("cpu")
    footprint = SpanFootprint((0, 4), weight_bytes=10 * GIB, cache_tokens=2048, cache_bytes=GIB)
    check_fit(footprint, 11 * GIB, device, torch.float16, "--blocks")  # exactly fits
    with pytest.raises(ConfigError) as error:
        check_fit(footprint, 8 * GIB, device, torch.float16, "--blocks")
    message = str(error.value)
    for part in (
        "--blocks",
        "blocks 0:4",
        "10.0 GiB of float16 weights",
        "1.0 GiB of KV cache",
        "2048 positions",
    ):
        assert part in message, message
    assert "= 11.0 GiB, but only 8.0 GiB of RAM is free" in message


def test_free_memory_of_the_cpu_is_available_ram():
    free = devices.free_memory_bytes(torch.device("cpu"))
    assert 0 < free <= psutil.virtual_memory().total


# ---- the command line ----


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardnet", "serve", *args], capture_output=True, text=True, timeout=120
    )


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cli_cuda_without_cuda(llama_untied, device):
    _one_line_error(
        _serve("--model", str(llama_untied), "--blocks", "0:2", "--device", device),
        f"--device {device}",
        "CUDA is not available",
    )


@pytest.mark.skipif(HAS_MPS, reason="this machine has MPS")
def test_cli_mps_without_mps(llama_untied):
    _one_line_error(
        _serve("--model", str(llama_untied), "--num-blocks", "2", "--device", "mps"), "MPS is not available"
    )


def test_cli_bogus_device_is_an_argument_error(llama_untied):
    _one_line_error(
        _serve("--model", str(llama_untied), "--blocks", "0:2", "--device", "bogus"), "--device", "cuda:N"
    )


def test_cli_without_blocks_or_num_blocks_suggests_both(llama_untied):
    _one_line_error(_serve("--model", str(llama_untied)), "--num-blocks N", "--blocks START:END")


def test_cli_num_blocks_beyond_the_model(llama_untied):
    _one_line_error(_serve("--model", str(llama_untied), "--num-blocks", "7"), "--num-blocks 7", "6 blocks")


def _write_sparse_checkpoint(folder: Path, config: LlamaConfig) -> int:
    """A valid safetensors checkpoint of block 0 (one shard and its index, as save_pretrained writes big
    models) whose data is a hole in a sparse file: its headers are a real model's, its weights all
    zeros, and it takes no disk. Returns the data bytes."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": [hidden, hidden],
        "model.layers.0.self_attn.k_proj.weight": [kv, hidden],
        "model.layers.0.self_attn.v_proj.weight": [kv, hidden],
        "model.layers.0.self_attn.o_proj.weight": [hidden, hidden],
        "model.layers.0.mlp.gate_proj.weight": [inter, hidden],
        "model.layers.0.mlp.up_proj.weight": [inter, hidden],
        "model.layers.0.mlp.down_proj.weight": [hidden, inter],
        "model.layers.0.input_layernorm.weight": [hidden],
        "model.layers.0.post_attention_layernorm.weight": [hidden],
    }
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        size = torch.Size(shape).numel() * 4
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file = folder / "model-00001-of-00001.safetensors"
    with open(file, "wb") as stream:
        stream.write(struct.pack("<Q", len(raw)) + raw)
    try:
        with open(file, "r+b") as stream:
            stream.truncate(8 + len(raw) + offset)
    except OSError as exc:
        pytest.skip(f"this filesystem cannot hold a sparse file of {offset / GIB:.0f} GiB: {exc}")
    index = {"metadata": {"total_size": offset}, "weight_map": dict.fromkeys(shapes, file.name)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config.to_json_file(folder / "config.json")
    return offset


@pytest.mark.slow  # the default suite must stay under 10 minutes: README "Tests" says what covers it
def test_cli_span_too_big_for_memory_exits_before_loading(tmp_path):
    """One block of ~800 GiB (float32) on a machine with less RAM free: refused with the numbers."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=65536,
        intermediate_size=1 << 20,
        num_hidden_layers=1,
        num_attention_heads=512,
        num_key_value_heads=8,
        max_position_embeddings=512,
    )
    data_bytes = _write_sparse_checkpoint(tmp_path, config)
    if data_bytes < psutil.virtual_memory().available:
        pytest.skip("this machine has more RAM free than the test's block takes")
    line = _one_line_error(
        _serve("--model", str(tmp_path), "--blocks", "0:1", "--device", "cpu", "--dtype", "float32"),
        "--blocks: blocks 0:1 do not fit on cpu",
        "GiB of float32 weights",
        "of RAM is free",
    )
    assert f"{data_bytes / GIB:.1f} GiB of float32 weights" in line
    # Asked to serve it in bfloat16, the weights count half.
    _one_line_error(
        _serve("--model", str(tmp_path), "--num-blocks", "1", "--dtype", "bfloat16"),
        "--num-blocks: blocks 0:1",
        f"{data_bytes / 2 / GIB:.1f} GiB of bfloat16 weights",
    )
