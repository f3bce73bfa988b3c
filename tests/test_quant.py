"""--quant: spans really quantized and close to exact; announced; routed to only when a client accepts it."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
import torch
from torch import nn

from shardnet import ShardedModel
from shardnet.cli import build_parser
from shardnet.client.config import QUANT_MODES as CLIENT_MODES
from shardnet.errors import ConfigError, RouteNotFoundError
from shardnet.launch import LocalSwarm
from shardnet.models import Checkpoint, SpanInputs, adapter_for, load_config
from shardnet.models.quantization import QUANT_MODES, check_quant_supported, module_bytes, quantize_span
from shardnet.server.config import QUANT_NAMES
from shardnet.wire import pb, pb_grpc

from .conftest import make_llama, reference

bnb = pytest.importorskip("bitsandbytes")
torchao_quantization = pytest.importorskip("torchao.quantization")
CPU = torch.device("cpu")


def _quantized_layers(span, mode: str) -> list[nn.Module]:
    """The span's linear layers in their quantized form: int8 keeps nn.Linear with a torchao weight,
    nf4 replaces the layer with bitsandbytes' Linear4bit."""
    if mode == "int8":
        return [
            m
            for m in span.modules()
            if type(m) is nn.Linear and isinstance(m.weight, torchao_quantization.Int8Tensor)
        ]
    return [m for m in span.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _leaf_tensors(span) -> list[torch.Tensor]:
    """Every tensor holding the span's memory, the ones inside torchao's weights included."""
    tensors = []
    for tensor in list(span.parameters()) + list(span.buffers()):
        if hasattr(tensor, "__tensor_flatten__"):
            tensors.extend(getattr(tensor, name) for name in tensor.__tensor_flatten__()[0])
        else:
            tensors.append(tensor)
    return tensors


def _span(path, start: int, end: int, dtype: torch.dtype = torch.float32):
    config = load_config(path)
    return adapter_for(config).load_span(Checkpoint(path), config, start, end, dtype)


def _run(span, hidden: torch.Tensor) -> torch.Tensor:
    """Prefill all but the last position, then one decode step with the KV cache: [batch, seq, hidden]."""
    batch, seq = hidden.shape[:2]
    positions = torch.arange(seq).expand(batch, -1)  # [batch, seq]
    cache = span.new_cache()
    first = span.run(hidden[:, :-1], SpanInputs(None, positions[:, :-1]), cache, span.start, span.end)
    last = span.run(hidden[:, -1:], SpanInputs(None, positions[:, -1:]), cache, span.start, span.end)
    return torch.cat([first, last], dim=1)


def _checkpoint_maps(path) -> list[tuple[int, int]]:
    """Address ranges where this process maps the model's safetensors files (Linux)."""
    ranges = []
    for line in open("/proc/self/maps").read().splitlines():
        if line.endswith(".safetensors") and str(path) in line:
            low, high = line.split()[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


@pytest.mark.parametrize(("mode", "max_bytes_ratio", "max_error"), [("int8", 0.3, 0.05), ("nf4", 0.2, 0.25)])
def test_quantize_span_replaces_linears_shrinks_memory_and_stays_close(
    llama_untied, mode, max_bytes_ratio, max_error
):
    exact, span = _span(llama_untied, 1, 4), _span(llama_untied, 1, 4)
    norms_before = {name: p.clone() for name, p in span.named_parameters() if "norm" in name}
    float_bytes = module_bytes(span)

    quantize_span(span, mode, CPU)

    layers = _quantized_layers(span, mode)
    assert len(layers) == 3 * 7  # q, k, v, o, gate, up, down per block: every linear layer
    for layer in layers:
        data = layer.weight.qdata if mode == "int8" else layer.weight
        assert data.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    for name, param in span.named_parameters():
        if "norm" in name:  # norms (and the rotary buffers) are left as loaded
            assert param.dtype == torch.float32 and torch.equal(param, norms_before[name])
    assert module_bytes(span) <= max_bytes_ratio * float_bytes
    # Nothing left pointing into the checkpoint's memory map, so the map and its float pages can go.
    mapped = _checkpoint_maps(llama_untied)
    for tensor in _leaf_tensors(span):
        assert not any(low <= tensor.data_ptr() < high for low, high in mapped)

    hidden = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0))  # [batch, seq, hidden]
    want, got = _run(exact, hidden), _run(span, hidden)
    # Compare what the blocks add to the residual stream, not the stream itself (which carries the input).
    error = ((got - want).norm() / (want - hidden).norm()).item()
    assert 0 < error < max_error, error


def test_int8_is_weight_only_the_float_span_with_rounded_weights(llama_untied):
    span, rounded = _span(llama_untied, 0, 2), _span(llama_untied, 0, 2)
    quantize_span(span, "int8", CPU)
    weights = {name: module.weight for name, module in span.named_modules() if isinstance(module, nn.Linear)}
    with torch.no_grad():
        for name, module in rounded.named_modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(weights[name].dequantize())
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    # Activations stay float: the result is the float span's with each weight rounded to its int8 grid.
    assert torch.allclose(_run(span, hidden), _run(rounded, hidden), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_bfloat16_span_computes_in_bfloat16(llama_untied, mode):
    span = _span(llama_untied, 0, 2, torch.bfloat16)
    quantize_span(span, mode, CPU)
    hidden = torch.randn(1, 4, 64).to(torch.bfloat16)
    out = _run(span, hidden)
    assert out.dtype == torch.bfloat16 and out.shape == hidden.shape and torch.isfinite(out).all()


def test_nf4_runs_layers_whose_width_its_fused_cpu_kernel_cannot_pack(tmp_path):
    path = make_llama(tmp_path, num_hidden_layers=1, intermediate_size=72)  # 72 rows: not a multiple of 32
    span = _span(path, 0, 1)
    quantize_span(span, "nf4", CPU)
    hidden = torch.randn(1, 3, 64)
    assert torch.isfinite(_run(span, hidden)).all()


def test_quant_none_leaves_the_span_alone(llama_untied):
    span = _span(llama_untied, 0, 2)
    before = list(span.modules())
    quantize_span(span, "none", CPU)
    assert list(span.modules()) == before


def test_unavailable_modes_are_one_line_config_errors(monkeypatch):
    check_quant_supported("none", torch.device("meta"))  # exact weights need nothing
    with pytest.raises(ConfigError, match=r"--quant 'fp8' is not one of none, int8, nf4"):
        check_quant_supported("fp8", CPU)
    with pytest.raises(ConfigError, match=r"--quant nf4 is not available on meta: it runs on cpu and cuda"):
        check_quant_supported("nf4", torch.device("meta"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--quant int8 on cuda: .*no CUDA"):
            check_quant_supported("int8", torch.device("cuda"))
    for mode, library in (("int8", "torchao"), ("nf4", "bitsandbytes")):
        monkeypatch.setitem(sys.modules, library, None)  # as if not installed
        with pytest.raises(ConfigError, match=rf"--quant {mode} needs {library}, .*pip install") as raised:
            check_quant_supported(mode, CPU)
        assert "\n" not in str(raised.value)


def test_every_layer_knows_the_same_modes():
    assert QUANT_NAMES == QUANT_MODES == CLIENT_MODES
    for mode in QUANT_MODES:
        args = build_parser().parse_args(["serve", "--model", "m", "--blocks", "0:1", "--quant", mode])
        assert args.quant == mode


# ---- the command line ----


def _serve(path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "shardnet", "serve", "--model", str(path), "--blocks", "0:2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_quant_flag_is_an_argparse_error(llama_untied):
    line = _one_line(_serve(llama_untied, "--quant", "int4"))
    assert "--quant" in line and "int4" in line


def test_quant_without_its_library_fails_before_loading(llama_untied, tmp_path):
    hidden = tmp_path / "bitsandbytes"
    hidden.mkdir()
    (hidden / "__init__.py").write_text('raise ImportError("hidden by a test")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    line = _one_line(_serve(llama_untied, "--quant", "nf4", env=env))
    assert line.startswith("shardnet serve: error: --quant nf4 needs bitsandbytes"), line
    assert "hidden by a test" in line


# ---- a real swarm with one int8 server ----


@pytest.fixture(scope="module")
def int8_swarm(llama_untied, tmp_path_factory):
    swarm = LocalSwarm(
        llama_untied,
        [(0, 6)],
        extra_args=["--quant", "int8"],
        log_dir=tmp_path_factory.mktemp("logs_quant"),
        torch_threads=1,
    )
    swarm.start(timeout_s=180)
    yield swarm
    swarm.stop()


def test_default_client_refuses_a_quantized_server(int8_swarm):
    with ShardedModel.from_pretrained(
        int8_swarm.model_path, int8_swarm.initial_peers, route_timeout_s=1.0
    ) as model:
        with pytest.raises(RouteNotFoundError, match=r"blocks 0:6 .*1 server\(s\) quant int8"):
            model(torch.tensor([[5, 6, 7]]))


@pytest.mark.parametrize("quant", ["int8", "any"])
def test_client_that_accepts_int8_generates_close_to_exact(int8_swarm, quant):
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with ShardedModel.from_pretrained(int8_swarm.model_path, int8_swarm.initial_peers, quant=quant) as model:
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        [hop] = model.last_route
    assert hop.server.record.quant == "int8"
    with torch.no_grad():
        want = reference(int8_swarm.model_path)(ids).logits
    assert logits.shape == want.shape
    assert 0 < (logits - want).abs().max().item() < 0.05 * want.abs().max().item()
    assert out.shape == (1, 14) and torch.equal(out[:, :8], ids)


def test_info_reports_the_quantization(int8_swarm):
    with ShardedModel.from_pretrained(int8_swarm.model_path, int8_swarm.initial_peers, quant="int8") as model:
        model(torch.tensor([[5, 6, 7]]))
        [hop] = model.last_route
    with grpc.insecure_channel(hop.server.address) as channel:
        info = pb_grpc.ShardStub(channel).Info(pb.InfoRequest(), timeout=10)
    assert info.quant == "int8" and info.state == "online"


def test_importing_the_client_prints_nothing_with_the_quant_extra_installed():
    """transformers imports torchao whenever it is installed; torchao's warnings about CUDA kernels a CPU
    torch lacks (and torch's about its type registrations) must not reach a Python user's terminal."""
    result = subprocess.run(
        [sys.executable, "-c", "from shardnet import ShardedModel; print(ShardedModel.__name__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ShardedModel"
    assert result.stderr == ""
