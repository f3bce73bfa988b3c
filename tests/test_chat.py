"""`shardnet chat` as a user runs it: turns over one session, /reset, /quit, against a real SmolLM2 swarm."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardnet import ShardedModel

FIRST = "What is the capital of France?"
SECOND = "And of Italy?"
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def swarm(smollm2_swarm):
    return smollm2_swarm


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


def _templated(tokenizer, messages: list[dict[str, str]]) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    return encoded["input_ids"]  # [1, prompt]


def _chat(*args: str, stdin: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardnet", "chat", *args],
        input=stdin,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_chat_turns_continue_one_session_and_reset_starts_over(swarm, smollm2_path, tokenizer):
    args = ("--model", str(smollm2_path), "--initial-peers", *swarm.initial_peers)
    args += ("--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS))
    result = _chat(*args, stdin=f"{FIRST}\n{SECOND}\n/reset\n{FIRST}\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert " INFO " not in result.stdout + result.stderr, result.stdout + result.stderr
    assert not result.stderr.strip(), result.stderr  # nothing but the answers: no warning, no log line

    # Turn 1: what one greedy generate through the swarm answers to the templated first message.
    first_ids = _templated(tokenizer, [{"role": "user", "content": FIRST}])
    with ShardedModel.from_pretrained(smollm2_path, initial_peers=swarm.initial_peers) as client:
        got = client.generate(first_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    first = tokenizer.decode(got[0, first_ids.shape[1] :], skip_special_tokens=True)

    # Turn 2 continues the conversation: the greedy continuation of the whole templated two-turn chat.
    local = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    both_ids = _templated(
        tokenizer,
        [
            {"role": "user", "content": FIRST},
            {"role": "assistant", "content": first},
            {"role": "user", "content": SECOND},
        ],
    )
    want = local.generate(both_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    second = tokenizer.decode(want[0, both_ids.shape[1] :], skip_special_tokens=True)

    out = result.stdout
    print(out)
    assert first.strip() and second.strip() and first != second
    assert out.count(first + "\n") == 2, out  # turn 3, after /reset, is turn 1 again
    assert out.index(first + "\n") < out.index(second + "\n") < out.index("(new conversation)"), out
    assert out.rindex(first + "\n") > out.index("(new conversation)"), out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--model", "/nonexistent", "--initial-peers", "/ip4/127.0.0.1/tcp/1"), ["/nonexistent"]),
    ],
)
def test_bad_chat_flags(args, words):
    env = {k: v for k, v in os.environ.items() if k != "SHARDNET_INITIAL_PEERS"}
    result = subprocess.run(
        [sys.executable, "-m", "shardnet", "chat", *args],
        input="",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert all(word in lines[0] for word in words), lines[0]
