"""Weight-only quantization of a served span (``shardnet serve --quant none|int8|nf4``).

Every ``nn.Linear`` of the span (attention and MLP projections) is quantized in place, one layer at a
time; norms, rotary buffers and everything the client keeps stay as loaded. Activations are never
quantized: each matmul takes the span's dtype on its input side.

- ``int8``: torchao's ``Int8WeightOnlyConfig``: int8 weights with one scale per output row (symmetric);
  each matmul casts the int8 weight to the activations' dtype and scales the product.
- ``nf4``: bitsandbytes' ``Linear4bit`` with 4-bit NormalFloat (QLoRA's format): blocks of 64 weights,
  each with a scale that is itself quantized; computed in the span's dtype, except on x86 CPUs with
  AVX512-BF16, where bitsandbytes' fused kernel computes in bfloat16.

Why these two libraries (tried on this machine class, x86-64 CPU, torch 2.13.0+cpu, November 2026; each
installs from one wheel that pulls neither torch nor CUDA packages, and both are released monthly):

- bitsandbytes 0.50.2 is the reference NF4 (transformers' ``load_in_4bit``, Petals' ``--quant_type nf4``)
  and documents it on CPU (x86-64 with AVX2, aarch64) and NVIDIA GPUs (compute capability 6.0+); it ran
  here in float32, bfloat16 and float16. Its int8 is LLM.int8(), which is not weight-only: it quantizes
  the activations too (all but outlier columns above 6.0), and on SmolLM2 its logits strayed 4x further
  from the float model's than weight-only int8 (mean abs 0.79 against 0.21, four prompts), and ran slower.
- torchao 0.18.0's int8 weight-only is exactly per-row int8 weights (its logits equal a float model with
  rounded weights), runs on CPU and CUDA with plain torch ops, and was the fastest int8 here. Its NF4 is
  a prototype (``torchao.prototype``) that fails on SmolLM2's shapes (5184 scales per 576 x 576 weight
  are not a multiple of its 256-scale blocks) and ran a decode matmul 10x slower than bitsandbytes'.
- optimum-quanto 0.2.7 (last release March 2025) has no NF4, and its qint4 failed under
  ``torch.inference_mode`` ("Cannot set version_counter for inference tensor"), which every span runs in.

On CPU a quantized step is not faster than float32 (weights are expanded on the fly); the gain is
memory. ``benchmarks/quant.py`` measures memory, speed and the logits' deviation per mode.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import logging
import sys
from types import ModuleType

import torch
from torch import nn

from shardnet.errors import ConfigError
from shardnet.import_noise import quiet_imports

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "nf4")  # what --quant takes and a server announces
NF4_BLOCK_SIZE = 64  # weights per NF4 scale (bitsandbytes' default)
_LIBRARIES = {"int8": ("torchao", "torchao>=0.18"), "nf4": ("bitsandbytes", "bitsandbytes>=0.50")}
_DEVICE_TYPES = ("cpu", "cuda")  # where both libraries document their mode and shardnet wires it
_MIN_CUDA_CAPABILITY = {"nf4": (6, 0)}  # bitsandbytes' minimum NVIDIA compute capability
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
    _library(mode)
    if device.type == "cuda":
        _check_cuda(mode, device)


def quantize_span(module: nn.Module, mode: str, device: torch.device) -> None:
    """Quantize every ``nn.Linear`` inside ``module`` in place; its weights must already be on ``device``.

    One layer at a time, so memory peaks at the loaded span plus one layer's copy; afterwards nothing
    of the float weights stays resident (see ``_let_go_of_checkpoint``).
    """
    check_quant_supported(mode, device)
    if mode == "none":
        return
    library = _library(mode)
    before = module_bytes(module)
    targets = [
        (parent, name)
        for parent in list(module.modules())
        for name, child in parent.named_children()
        if _is_float_linear(child)
    ]
    for parent, name in targets:
        linear = getattr(parent, name)
        if linear.weight.device.type != device.type:
            raise ValueError(f"quantize_span: weights are on {linear.weight.device}, not on {device}")
        if mode == "int8":
            _int8_in_place(library, linear, device)
        else:
            setattr(parent, name, _nf4_linear(library, linear, device))
        del linear  # the float weight goes now (nothing else may hold it), not when the loop ends
        _trim_heap()  # else the float temporaries of every layer pile up: measured 2x the span at peak
    _let_go_of_checkpoint(module)
    logger.info(
        "quantized %d linear layers to %s: %.1f MiB -> %.1f MiB",
        len(targets),
        mode,
        before / 2**20,
        module_bytes(module) / 2**20,
    )


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, quantized data and scales included."""
    seen: dict[int, int] = {}

    def count(tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        if hasattr(tensor, "__tensor_flatten__"):  # a torchao tensor: count the tensors it wraps
            for name in tensor.__tensor_flatten__()[0]:
                count(getattr(tensor, name))
            return
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        state = getattr(tensor, "quant_state", None)  # bitsandbytes NF4: block scales, code book, nested
        while state is not None:
            count(state.absmax)
            count(state.code)
            count(getattr(state, "offset", None))
            state = getattr(state, "state2", None)

    for tensor in list(module.parameters()) + list(module.buffers()):
        count(tensor)
    return sum(seen.values())


def _is_float_linear(layer: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) whose weight is still a plain float tensor."""
    return (
        isinstance(layer, nn.Linear)
        and type(layer.weight) in (torch.Tensor, nn.Parameter)
        and layer.weight.dtype.is_floating_point
    )


def _library(mode: str) -> ModuleType:
    name, requirement = _LIBRARIES[mode]
    try:
        with quiet_imports():
            return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install failing as it loads its libraries
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"--quant {mode} needs {name}, which cannot be imported here ({reason}); "
            f"install it with: pip install 'shardnet[quant]' (or '{requirement}')"
        ) from None


def _check_cuda(mode: str, device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(f"--quant {mode} on {device}: this torch build sees no CUDA device")
    capability = torch.cuda.get_device_capability(device)
    needed = _MIN_CUDA_CAPABILITY.get(mode)
    if needed and capability < needed:
        raise ConfigError(
            f"--quant {mode} is not available on {device} ({torch.cuda.get_device_name(device)}, compute "
            f"capability {capability[0]}.{capability[1]}): {_LIBRARIES[mode][0]} needs "
            f"{needed[0]}.{needed[1]} or newer"
        )
    if mode != "nf4":
        return
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


def _int8_in_place(torchao: ModuleType, linear: nn.Linear, device: torch.device) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    # set_inductor_config=False: leave torch.compile's global settings alone (spans run eagerly).
    quantize_(linear, Int8WeightOnlyConfig(set_inductor_config=False), device=device)


def _nf4_linear(bnb: ModuleType, linear: nn.Linear, device: torch.device) -> nn.Module:
    dtype = linear.weight.dtype
    with torch.device("meta"):  # no throwaway float weight
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
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    layer.eval()
    if device.type == "cpu":  # repack for the fused CPU kernel now, not in the first request's step
        with torch.no_grad():
            layer(torch.zeros(1, linear.in_features, dtype=dtype, device=device))
    return layer


def _let_go_of_checkpoint(module: nn.Module) -> None:
    """Copy what was not quantized (norms, biases, buffers: a few KiB) and give freed memory back.

    safetensors maps the whole checkpoint file and hands out views of that one map, so while a single
    norm weight still points into it, the map stays and every float weight page read through it stays
    resident: a quantized SmolLM2 server took 1193 MiB against 825 MiB unquantized before this.
    """
    for tensor in list(module.parameters()) + list(module.buffers()):
        if type(tensor) in (torch.Tensor, nn.Parameter):  # not a quantized weight
            tensor.data = tensor.data.clone()
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS: glibc keeps them, and the quantized weights allocated
    between a layer's float temporaries keep it from reusing them for the next layer's."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only; musl has none)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()
