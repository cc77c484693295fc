"""``layerwise runtime test --lm-eval``: zero-shot accuracy (lm-evaluation-harness) of the dense model and of
every profile the controller chose, so the perplexity-based reward can be read against task accuracy.

A KV-cache profile evicts only while generating; lm-eval scores log-likelihoods in one forward pass, where it
would change nothing, so those profiles are reported as the dense model's score and marked so.
"""

from __future__ import annotations

from typing import Any

from ..evaluate.zeroshot import ZeroShotResult, headline_metric, zeroshot
from ..report.tables import markdown_table
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
    """Markdown: one row per profile, the headline accuracy ± stderr of each task."""
    tasks = list(next(iter(results.values())).scores)
    rows: list[list[Any]] = []
    for name, result in results.items():
        cells = []
        for task in tasks:
            score = result.scores[task]
            metric = headline_metric(score.model_dump())
            value, stderr = getattr(score, metric), getattr(score, f"{metric}_stderr")
            cells.append(f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}")
        note = " (= dense: no generation)" if env.profiles.spec(name).kind == "kv_cache" else ""
        rows.append([name + note, *cells])
    return markdown_table(["profile", *tasks], rows)
