"""`shardnet eval` (issue 22): lm-evaluation-harness through the swarm gives lm-eval's own local `hf` run's
figures, on the shipped multiple-choice task and its generate_until twin, on SmolLM2 and on a GPT-2-shaped
model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from shardnet.evaluation import EvalConfig, run_eval
from shardnet.launch import LocalSwarm

lm_eval = pytest.importorskip("lm_eval")
TASKS = ["shardnet_facts", "shardnet_facts_gen"]
INCLUDE = Path("benchmarks/eval")


def local_figures(model_path: Path, limit: int) -> dict:
    """lm-eval's own run of the same folder with its `hf` model, on this process's CPU."""
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_path},dtype=float32",
        device="cpu",
        tasks=TASKS,
        limit=limit,
        task_manager=TaskManager(include_path=str(INCLUDE)),
    )
    return figures(results["results"])


def figures(results: dict) -> dict:
    """Every metric of every task (numbers only: names and aliases dropped)."""
    return {
        (task, metric): float(value)
        for task, metrics in results.items()
        for metric, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "sample_len"
    }


def test_shardnet_eval_equals_local_lm_eval_on_smollm2(smollm2_swarm, smollm2_path, tmp_path, capsys):
    """What `shardnet eval --tasks ... --include-path benchmarks/eval --limit 4 --output-path OUT` runs (the
    command's flags are tested in tests/test_cli.py), against lm-eval's own local run."""
    out = tmp_path / "out"
    out.mkdir()
    config = EvalConfig(smollm2_path, tuple(smollm2_swarm.initial_peers), tuple(TASKS), out, INCLUDE, limit=4)
    run_eval(config)
    printed = capsys.readouterr()
    assert "|shardnet_facts    |" in printed.out and "Tasks" in printed.out  # lm-eval's table
    assert "warn" not in printed.err.lower(), printed.err[-3000:]
    swarm = figures(json.loads((out / "results.json").read_text())["results"])
    assert swarm == local_figures(smollm2_path, 4)
    assert swarm[("shardnet_facts", "acc,none")] > 0.5  # the real model knows most of these facts


@pytest.mark.slow  # 25 s; the SmolLM2 test above runs the same path (README "Tests")
def test_a_gpt2_shaped_model_evaluates_as_locally(smollm2_path, tmp_path):
    """GPT-2's architecture (learned positions, transformer.h blocks), random weights, SmolLM2's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=49152, n_positions=256, n_embd=64, n_layer=4, n_head=4, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_path / name, folder / name)
    with LocalSwarm(folder, [(0, 2), (2, 4)], log_dir=tmp_path, torch_threads=1) as swarm:
        results = run_eval(
            EvalConfig(
                folder, tuple(swarm.initial_peers), tuple(TASKS), tmp_path / "gpt2.json", INCLUDE, limit=6
            )
        )
    assert figures(results["results"]) == local_figures(folder, 6)
