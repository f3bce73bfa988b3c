"""SmolLM2-135M-Instruct (the demo model) through a real swarm, and `shardnet demo` as a user runs it."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardnet import ShardedModel
from shardnet.demo import DEFAULT_PROMPT
from shardnet.launch import LocalSwarm, even_spans

PROMPT = DEFAULT_PROMPT  # what `shardnet demo` asks when given no --prompt
LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."
DEMO_TOKENS = 24


@pytest.fixture(scope="module")
def swarm(smollm2_path, tmp_path_factory):
    local = LocalSwarm(
        smollm2_path, even_spans(30, 3), log_dir=tmp_path_factory.mktemp("smollm2_logs"), torch_threads=1
    )
    local.start(timeout_s=180)
    yield local
    local.stop()


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def chat_ids(tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": PROMPT}]
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    return encoded["input_ids"]  # [1, prompt]


def test_converted_folder_keeps_chat_template_and_end_of_turn(smollm2_path, tokenizer):
    local = AutoModelForCausalLM.from_pretrained(smollm2_path)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    assert local.generation_config.eos_token_id == im_end
    assert local.config.tie_word_embeddings
    assert local.lm_head.weight.data_ptr() == local.model.embed_tokens.weight.data_ptr()


@pytest.fixture(scope="module")
def local(smollm2_path):
    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


def test_swarm_matches_transformers_on_smollm2(swarm, smollm2_path, chat_ids, local):
    assert swarm.spans == [(0, 10), (10, 20), (20, 30)]
    with ShardedModel.from_pretrained(smollm2_path, initial_peers=swarm.initial_peers) as client:
        got_logits = client(chat_ids).logits[:, -1]  # [1, vocab]
        got = client.generate(chat_ids, max_new_tokens=24, do_sample=False)
    with torch.no_grad():
        want_logits = local(chat_ids).logits[:, -1]
    want = local.generate(chat_ids, max_new_tokens=24, do_sample=False)
    assert got.shape[1] == chat_ids.shape[1] + 24
    assert got.tolist() == want.tolist()
    diff = (got_logits - want_logits).abs().max().item()
    print(f"SmolLM2 last-position logits max abs diff: {diff:.2e}")
    assert diff <= 1e-4


def _demo(*args: str, cache_dir, **popen) -> subprocess.Popen:
    env = dict(os.environ, SHARDNET_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "shardnet", "demo", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def _read_until(process: subprocess.Popen, marker: bytes, timeout_s: float) -> bytes:
    """Stdout so far, once it holds ``marker`` and at least one byte after it (the first streamed text)."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    seen, deadline = b"", time.monotonic() + timeout_s
    while marker not in seen or seen.endswith(marker):
        assert time.monotonic() < deadline, f"no {marker!r} in {timeout_s}s: {seen!r}"
        if selector.select(timeout=1.0):
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"demo exited with {process.wait()} before {marker!r}: {seen!r}"
            seen += chunk
    return seen


def _descendants(process: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)


def _alive(processes: list[psutil.Process], timeout_s: float = 15.0) -> list[psutil.Process]:
    """Those still running after timeout_s (torch_shm_manager leaves a moment after its last client)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return alive


@pytest.mark.canary  # scripts/canary.sh: the first thing a new user runs, on the newest releases
def test_demo_answers_as_transformers_with_no_warning_and_leaves_no_processes(
    smollm2_path, tokenizer, chat_ids, local
):
    process = _demo("--max-new-tokens", str(DEMO_TOKENS), cache_dir=smollm2_path.parent)
    head = _read_until(process, f"generating up to {DEMO_TOKENS} tokens:\n".encode(), timeout_s=180)
    children = _descendants(process)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode()
    text = (head + out).decode()
    # The answer is local transformers' greedy answer to the same chat turn, and the terminal got nothing
    # but the story and the answer: no warning (from transformers or anyone), no log line.
    answer = text.split(f"generating up to {DEMO_TOKENS} tokens:\n", 1)[1].split("\ntime to first token")[0]
    want = local.generate(chat_ids, max_new_tokens=DEMO_TOKENS, do_sample=False)[0, chat_ids.shape[1] :]
    assert answer.strip() == tokenizer.decode(want, skip_special_tokens=True).strip()
    assert "rainbow" in answer.lower() or "light" in answer.lower(), answer
    assert not err.decode().strip(), err.decode()
    assert "waited" in text and "blocks 0:30" in text
    hops = [line.split() for line in text.splitlines() if line.startswith("  blocks ")]
    assert [(hop[1], hop[2], hop[3][:2]) for hop in hops] == [
        ("0:10", "peer", ".."),
        ("10:20", "peer", ".."),
        ("20:30", "peer", ".."),
    ]
    assert "time to first token" in text and "tokens/s" in text
    # No log line lands in the streamed answer: the terminal shows warnings only, the rest is in demo.log.
    assert " INFO " not in text + err.decode(), text + err.decode()
    assert "session open" in (smollm2_path.parent / "demo-logs" / "demo.log").read_text()
    assert len(children) >= 4  # DHT node + 3 servers at least
    assert not _alive(children)


@pytest.mark.slow  # before a release: pytest -m slow (README "Tests")
def test_ctrl_c_stops_the_swarm(smollm2_path):
    # Its own process group, so that killpg stands for Ctrl-C at a terminal: every process in the
    # foreground group gets SIGINT.
    args = ("--servers", "2", "--max-new-tokens", "2000", "--prompt", LONG_PROMPT)
    process = _demo(*args, cache_dir=smollm2_path.parent, start_new_session=True)
    _read_until(process, b"generating up to 2000 tokens:\n", timeout_s=180)
    children = _descendants(process)
    os.killpg(process.pid, signal.SIGINT)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(
            f"the demo did not stop within 60 s of Ctrl-C; stdout ends {out[-300:]!r}, stderr {err[-2000:]!r}"
        )
    assert process.returncode == 130, err.decode()
    assert "interrupted, stopping the swarm" in out.decode()
    assert "Traceback" not in err.decode(), err.decode()
    assert not _alive(children)


def _run_demo(*args: str, cache_dir) -> subprocess.CompletedProcess:
    env = dict(os.environ, SHARDNET_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "shardnet", "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--servers", "0"), ["--servers", "positive"]),
        (("--servers", "99"), ["--servers 99", "30 blocks"]),
        (("--model", "/nonexistent"), ["/nonexistent", "does not exist"]),
    ],
)
def test_bad_demo_flags(smollm2_path, args, words):
    result = _run_demo(*args, cache_dir=smollm2_path.parent)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert all(word in lines[0] for word in words), lines[0]
