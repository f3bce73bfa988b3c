"""``shardnet eval``: lm-evaluation-harness (the ``lm_eval`` package) run through the swarm.

lm-eval's own ``HFLM`` takes a transformers model already built, and a ``ShardedModel`` is one: its
loglikelihood requests become stateless forwards through the swarm (``model(ids).logits``) and its
``generate_until`` requests transformers' ``generate`` on the swarm's caches. So the figures are lm-eval's
own, computed as for a local model, and equal to lm-eval's ``hf`` run on the same folder
(``tests/test_evaluation.py``). Tasks come from lm-eval's catalogue or from ``--include-path`` (YAML
files; data sets cannot come from the hub here, so shardnet ships a small local one in
``benchmarks/eval/``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from shardnet.client.model import ShardedModel
from shardnet.errors import ConfigError, ModelLoadError
from shardnet.swarm_key import SwarmKey

logger = logging.getLogger(__name__)
# lm-eval warns that a model passed in (not a name) ignores its loading arguments: true, and meant here.
_EXPECTED_NOTICES = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


@dataclass(frozen=True)
class EvalConfig:
    model_path: Path  # model folder with a tokenizer (the client's parts)
    initial_peers: tuple[str, ...]  # multiaddrs of DHT peers of the swarm serving the model
    tasks: tuple[str, ...]  # lm-eval task (or group) names
    output_path: Path  # where the results' JSON goes: a file, or a folder (then results.json in it)
    include_path: Path | None = None  # a folder of task YAML files, besides lm-eval's own catalogue
    limit: int | None = None  # at most this many documents per task
    batch_size: int = 1  # requests per forward pass
    dtype: str = "float32"  # dtype of the client's parts and of the servers used
    swarm_key: SwarmKey | None = None  # the key of a private swarm
    verify_fraction: float = 0.05  # probability that a hop's step is checked by other holders

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise ConfigError("--initial-peers is required (or set $SHARDNET_INITIAL_PEERS)")
        if self.include_path is not None and not self.include_path.is_dir():
            raise ConfigError(f"--include-path {self.include_path}: not a folder of task YAML files")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")


def run_eval(config: EvalConfig, out=None) -> dict:
    """Evaluate, print lm-eval's results table, write its JSON; returns the results."""
    lm_eval, hflm, task_manager_class = _lm_eval()
    task_manager = task_manager_class(include_path=str(config.include_path) if config.include_path else None)
    unknown = [task for task in config.tasks if not task_manager.match_tasks([task])]
    if unknown:
        where = f" in lm-eval's catalogue or {config.include_path}" if config.include_path else ""
        raise ConfigError(f"--tasks: no task named {', '.join(unknown)}{where}")
    tokenizer = _tokenizer(config.model_path)
    with ShardedModel.from_pretrained(
        config.model_path,
        initial_peers=config.initial_peers,
        dtype=getattr(torch, config.dtype),
        swarm_key=config.swarm_key,
        verify_fraction=config.verify_fraction,
    ) as model:
        with _expected_notices_dropped():
            lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(config.tasks), limit=config.limit, task_manager=task_manager
            )
    print(lm_eval.utils.make_table(results), file=out or sys.stdout)
    target = config.output_path / "results.json" if config.output_path.is_dir() else config.output_path
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {
        key: results[key] for key in ("results", "versions", "n-shot", "configs", "config") if key in results
    }
    target.write_text(json.dumps(document, indent=2, default=str))
    logger.info("results written to %s", target)
    return results


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(
            f"shardnet eval needs lm-evaluation-harness ({exc}); install it with: pip install 'shardnet[eval]'"
        ) from None
    return lm_eval, HFLM, TaskManager


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"--model {path}: evaluation needs a tokenizer in the folder ({exc})") from exc


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_EXPECTED_NOTICES)


@contextlib.contextmanager
def _expected_notices_dropped() -> Iterator[None]:
    drop = _DropExpected()
    # A filter acts on the logger a record is made on: lm-eval's modules each log on their own.
    loggers = [logging.getLogger(name) for name in ("lm_eval.evaluator", "lm_eval.models.huggingface")]
    for each in loggers:
        each.addFilter(drop)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(drop)
