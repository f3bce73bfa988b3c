"""The GPU and prefix-reuse benchmarks run end to end on this machine's CPU with small shapes (slow: not in
the default suite; ``pytest -m slow tests/test_benchmark_scripts.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _lines(args: list[str], tmp_path: Path) -> list[dict]:
    result = subprocess.run(
        [sys.executable, *args], cwd=BENCHMARKS, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_gpu_benchmark_runs_on_a_cpu_with_small_shapes(tmp_path):
    lines = _lines(["gpu.py", "--small", "--device", "cpu", "--work-dir", str(tmp_path)], tmp_path)
    summary = lines[-1]
    assert summary["bench"] == "gpu.summary"
    assert summary["greedy_agreement_13b"] == "64/64"
    assert summary["smollm2_fp32_tokens_exact"] is True
    assert summary["smollm2_fp32_max_logit_diff"] < 1e-4


@pytest.mark.slow
def test_prefix_benchmark_reuses_the_system_prompt_and_stays_exact(tmp_path):
    args = ["prefix.py", "--model", "tiny", "--system-tokens", "200", "--rounds", "1", "--servers", "2"]
    [line, summary] = _lines(args, tmp_path)
    assert line["hits_per_server"] == [1, 1] and line["tokens_reused_per_server"] == [192, 192]
    assert summary["outputs_match"] is True
