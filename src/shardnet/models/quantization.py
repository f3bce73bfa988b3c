"""Weight-only quantization of a served span (``shardnet serve --quant none|int8|nf4``), with bitsandbytes.

Each ``nn.Linear`` of the span (attention and MLP projections) is replaced, one at a time and in place,
by its bitsandbytes counterpart; norms, rotary buffers and everything the client keeps stay as loaded.

- ``int8``: LLM.int8() (``bnb.nn.Linear8bitLt``): weights int8 with one scale per output row. At matmul
  time the activations are quantized per row as well, except feature columns holding an outlier above
  ``INT8_THRESHOLD``, which are computed in 16 bits (bitsandbytes', transformers' and Petals' default).
- ``nf4``: 4-bit NormalFloat (``bnb.nn.Linear4bit``, as in QLoRA): blocks of 64 weights, each with a scale
  that is itself quantized (double quantization); computed in the span's dtype, except on x86 CPUs
  with AVX512-BF16, where bitsandbytes' fused kernel computes in bfloat16.

Why bitsandbytes (tried on this machine class, x86-64 CPU with torch 2.13.0+cpu, in November 2026):

- bitsandbytes 0.50.2 installs as one wheel that needs only torch, numpy and packaging (no CUDA
  packages), ships CPU and CUDA kernels together, and ran both modes here in float32, bfloat16 and
  float16. Its support table documents int8 and nf4 on CPU (x86-64 with AVX2, aarch64) and on NVIDIA
  GPUs (compute capability 6.0+, 7.5+ recommended; a fused 4-bit kernel for one-token decode steps).
  It is the library of transformers' ``load_in_8bit/4bit`` and of Petals' ``--quant_type``, released
  monthly. One library covers both modes with stable, non-prototype APIs.
- torchao 0.18.0 also installs cleanly; its ``Int8WeightOnlyConfig`` works on CPU (a little faster than
  bitsandbytes' int8 there), but NF4 lives in ``torchao.prototype`` ("file location temporary"), fails on
  SmolLM2's shapes (576 x 576 weights: 5184 scales are not a multiple of its 256-scale blocks) and ran a
  576 x 1536 decode matmul 10x slower than bitsandbytes' NF4 on CPU; its releases follow torch's closely.
- optimum-quanto 0.2.7 (last release March 2025) has no NF4; its qint4 failed under
  ``torch.inference_mode`` ("Cannot set version_counter for inference tensor"), which every span runs in.

On CPU both modes dequantize (or quantize activations) on the fly, so a step is slower than unquantized
float32; the gain is memory. ``benchmarks/quant.py`` measures both and the logits' deviation.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import logging
import sys

import torch
from torch import nn

from shardnet.errors import ConfigError

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "nf4")  # what --quant takes and a server announces
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold: larger activation features are computed in 16 bits
NF4_BLOCK_SIZE = 64  # weights per NF4 scale (bitsandbytes' default)
_DEVICE_TYPES = ("cpu", "cuda")  # where both modes are documented by bitsandbytes and wired here
_MIN_CUDA_CAPABILITY = (6, 0)  # bitsandbytes' minimum NVIDIA compute capability
_CPU_NF4_ROWS = 32  # output rows per block of bitsandbytes' fused CPU NF4 kernel


def check_quant_supported(mode: str, device: torch.device) -> None:
    """Raise ConfigError (one line) if ``--quant mode`` cannot run on ``device`` here."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"--quant {mode!r} is not one of {', '.join(QUANT_MODES)}")
    if mode == "none":
        return
    if device.type not in _DEVICE_TYPES:
        raise ConfigError(
            f"--quant {mode} is not available on {device.type}: it runs on {' and '.join(_DEVICE_TYPES)} only"
        )
    _bitsandbytes(mode)
    if device.type == "cuda":
        _check_cuda(mode, device)


def quantize_span(module: nn.Module, mode: str, device: torch.device) -> None:
    """Quantize every ``nn.Linear`` inside ``module`` in place; its weights must already be on ``device``.

    Layers are replaced one at a time, so memory peaks at the loaded span plus one layer's copy.
    """
    check_quant_supported(mode, device)
    if mode == "none":
        return
    bnb = _bitsandbytes(mode)
    quantized = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    before = module_bytes(module)
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or isinstance(child, quantized):
                continue
            if child.weight.device.type != device.type:
                raise ValueError(f"quantize_span: weights are on {child.weight.device}, not on {device}")
            make = _int8_linear if mode == "int8" else _nf4_linear
            setattr(parent, name, make(bnb, child, device))
            replaced += 1
    _detach_from_checkpoint(module, quantized)
    logger.info(
        "quantized %d linear layers to %s: %.1f MiB -> %.1f MiB%s",
        replaced,
        mode,
        before / 2**20,
        module_bytes(module) / 2**20,
        "; int8 matmuls take their inputs in float16" if mode == "int8" else "",
    )


def _detach_from_checkpoint(module: nn.Module, quantized: tuple[type, ...]) -> None:
    """Copy what was not quantized (norms, biases, buffers: a few KiB) and give freed memory back.

    safetensors maps the whole checkpoint file and hands out views of that one map, so while a single
    norm weight still points into it, the map stays and every float weight page read through it stays
    resident: a quantized span would take more memory than the float one.
    """
    for layer in list(module.modules()):
        if isinstance(layer, quantized):
            tensors = [layer.bias] if layer.bias is not None else []
        else:
            tensors = list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False))
        for tensor in tensors:
            tensor.data = tensor.data.clone()
    gc.collect()
    if sys.platform.startswith("linux"):
        try:  # glibc keeps freed heap pages (the float copies made while quantizing) unless asked
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library (musl): nothing to ask
            pass


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, with bitsandbytes' scales and quantization state."""
    seen: dict[int, int] = {}

    def count(tensor: object) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for tensor in list(module.parameters()) + list(module.buffers()):
        count(tensor)
        count(getattr(tensor, "SCB", None))  # int8: one scale per output row
        state = getattr(tensor, "quant_state", None)  # nf4: block scales, code book, nested scales
        while state is not None:
            count(state.absmax)
            count(state.code)
            count(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return sum(seen.values())


class _DropFloat16CastNotice(logging.Filter):
    """bitsandbytes logs a WARNING at every int8 matmul whose input is not float16 (every step of a
    float32 or bfloat16 span); ``quantize_span`` says it once at INFO instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _bitsandbytes(mode: str):
    # On CPUs with AVX512-BF16, importing bitsandbytes warns that an optional kernel package from the
    # Hugging Face hub is missing; its built-in kernel is used instead, so the warning is noise here.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        bnb = importlib.import_module("bitsandbytes")
    except Exception as exc:  # ImportError, or a broken install failing as it loads its libraries
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"--quant {mode} needs bitsandbytes, which cannot be imported here ({reason}); "
            "install it with: pip install 'bitsandbytes>=0.50'"
        ) from None
    finally:
        cpu_ops.setLevel(level)
    matmul_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropFloat16CastNotice) for f in matmul_log.filters):
        matmul_log.addFilter(_DropFloat16CastNotice())
    return bnb


def _check_cuda(mode: str, device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(f"--quant {mode} on {device}: this torch build sees no CUDA device")
    capability = torch.cuda.get_device_capability(device)
    if capability < _MIN_CUDA_CAPABILITY:
        raise ConfigError(
            f"--quant {mode} is not available on {device} ({torch.cuda.get_device_name(device)}, compute "
            f"capability {capability[0]}.{capability[1]}): bitsandbytes needs 6.0 or newer"
        )
    # bitsandbytes loads the CUDA library matching torch's CUDA at import, and puts a stand-in that
    # fails on first use in its place when none matches; refuse now rather than at the first step.
    try:
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except ImportError:  # an internal module; newer versions may move it, then their own errors apply
        return
    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        raise ConfigError(
            f"--quant {mode} is not available on {device}: bitsandbytes has no CUDA library for this "
            f"torch (CUDA {torch.version.cuda}); `python -m bitsandbytes` says why"
        )


def _int8_linear(bnb, linear: nn.Linear, device: torch.device) -> nn.Module:
    with torch.device("meta"):  # no throwaway float weight
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
        )
    # Int8Params quantizes when moved from the CPU to a device (also CPU to CPU); from a GPU it would only
    # be copied, so a GPU weight goes through the CPU, one layer at a time (as transformers does).
    weight = linear.weight.detach().to("cpu")
    layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    _keep_bias(layer, linear)
    return layer.eval()


def _nf4_linear(bnb, linear: nn.Linear, device: torch.device) -> nn.Module:
    dtype = linear.weight.dtype
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type="nf4",
        )
    weight = bnb.nn.Params4bit(
        linear.weight.detach(),
        requires_grad=False,
        blocksize=NF4_BLOCK_SIZE,
        compress_statistics=True,
        quant_type="nf4",
        module=layer,
    )
    layer.weight = weight.to(device)  # Params4bit quantizes on its first move to a real device
    if linear.out_features % _CPU_NF4_ROWS or linear.in_features % NF4_BLOCK_SIZE:
        # On CPUs with AVX512-BF16, bitsandbytes repacks a layer for its fused kernel on the first call,
        # 32 output rows by whole rows of 64-weight blocks, and fails on other shapes: those take its
        # generic path (dequantize, then matmul).
        layer.support_avx512bf16_for_cpu = False
    _keep_bias(layer, linear)
    return layer.eval()


def _keep_bias(layer: nn.Module, linear: nn.Linear) -> None:
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
