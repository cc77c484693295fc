"""``layerwise runtime test --lm-eval``: zero-shot accuracy (lm-evaluation-harness) of the dense model and of
every profile the controller chose, so the perplexity-based reward can be read against task accuracy.

A KV-cache profile evicts only while generating; lm-eval scores log-likelihoods in one forward pass, where it
would change nothing, so those profiles are reported as the dense model's score and marked so.
"""

from __future__ import annotations

from typing import Any

from ..evaluate.zeroshot import ZeroShotResult, zeroshot
from ..report.tables import markdown_table, score_cell
from .session import RuntimeEnvironment


def profile_accuracy(env: RuntimeEnvironment, profiles: list[str], tasks: str, limit: int | None,
                     seed: int = 0) -> dict[str, ZeroShotResult]:
    """Zero-shot scores of ``none`` and each profile in ``profiles`` (the dense model is back afterwards)."""
    results: dict[str, ZeroShotResult] = {}
    for name in dict.fromkeys(["none", *profiles]):
        if env.profiles.spec(name).kind == "kv_cache":
            continue
        with env.profiles.using(name):
            results[name] = zeroshot(env.loaded.model, env.loaded.tokenizer, tasks, limit, seed)
    for name in profiles:
        if name not in results:  # kv_cache: identical to dense under log-likelihood scoring
            results[name] = results["none"]
    return results


def accuracy_table(results: dict[str, ZeroShotResult], env: RuntimeEnvironment) -> str:
    """Markdown: one row per profile, the headline accuracy ± stderr of each task (the report's score cells)."""
    tasks = list(next(iter(results.values())).scores)
    rows: list[list[Any]] = []
    for name, result in results.items():
        note = " (= dense: no generation)" if env.profiles.spec(name).kind == "kv_cache" else ""
        rows.append([name + note, *(score_cell(result.scores[task].model_dump()) for task in tasks)])
    return markdown_table(["profile", *(f"{task} (%)" for task in tasks)], rows)
