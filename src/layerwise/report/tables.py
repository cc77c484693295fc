"""Rows of a run comparison, drawn from result.json records: one summary per run, text cells per column."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..evaluate.zeroshot import headline_metric
from .allocation import read_result


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass
class RunSummary:
    """What a comparison shows of one run; None where the run did not measure it."""

    name: str
    record: dict
    label: str
    ppl: Optional[float]
    parameters: int
    nonzero_parameters: int
    weight_bytes: int
    prefill_ms: Optional[float]
    decode_tokens_per_s: Optional[float]
    predicted_speedup: Optional[float]
    measured_speedup: Optional[float]
    scores: dict[str, dict] = field(default_factory=dict)
    kld: Optional[dict] = None  # KL divergence to the run's reference (mean, median, p99, p999, same_top)


def summarize(run_dir: str | Path) -> RunSummary:
    """The comparison summary of the run written to ``run_dir`` (by compress, apply or eval --out)."""
    record = read_result(run_dir)
    metrics = record["metrics"]
    latency = metrics.get("latency") or {}
    speedup = metrics.get("speedup") or {}
    plan = record.get("plan") or {}
    return RunSummary(
        name=Path(run_dir).resolve().name,
        record=record,
        label=_label(record),
        ppl=metrics.get("ppl"),
        parameters=metrics["parameters"],
        nonzero_parameters=metrics.get("nonzero_parameters", metrics["parameters"]),
        weight_bytes=metrics["weight_bytes"],
        prefill_ms=latency.get("prefill_ms"),
        decode_tokens_per_s=latency.get("decode_tokens_per_s"),
        predicted_speedup=(plan.get("prediction") or {}).get("speedup"),
        measured_speedup=speedup.get("total", speedup.get("prefill")),
        scores=(metrics.get("zeroshot") or {}).get("scores") or {},
        kld=metrics.get("kld"),
    )


def _label(record: dict) -> str:
    plan = record.get("plan")
    if not plan:
        return "as loaded (eval)"
    budget = ", ".join(f"{k} {v:g}" for k, v in (plan.get("budget") or {}).items())
    return f"{plan['method']} / {plan['allocator']} ({budget})"


def _cell(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def score_cell(score: Optional[dict]) -> str:
    """A task's headline accuracy in %, ± its standard error."""
    if not score:
        return "–"
    key = headline_metric(score)
    stderr = score.get(f"{key}_stderr")
    return f"{100 * score[key]:.1f}" + ("" if stderr is None else f" ± {100 * stderr:.1f}")


def task_columns(runs: list[RunSummary]) -> list[str]:
    """Every task any run scored, in first-seen order."""
    return list(dict.fromkeys(task for run in runs for task in run.scores))


def comparison_table(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Headers and text rows: perplexity, KL divergence to each run's reference (mean and 99.9th percentile,
    same top token in %), task accuracies (acc_norm where defined, in %), size and speed."""
    tasks = task_columns(runs)
    headers = ["run", "plan", "PPL", "mean KLD", "99.9% KLD", "same top (%)"]
    headers += [f"{task} ({_metric_name(runs, task)}, %)" for task in tasks]
    headers += ["parameters", "non-zero", "weight bytes", "predicted speedup", "prefill (ms)", "decode (tok/s)",
                "measured speedup"]
    rows = []
    for run in runs:
        kld = run.kld or {}
        row = [run.name, run.label, _cell(run.ppl, ".2f"), _cell(kld.get("mean"), ".4f"), _cell(kld.get("p999"), ".4f"),
               _cell(kld.get("same_top") and 100 * kld["same_top"], ".1f")]
        row += [score_cell(run.scores.get(task)) for task in tasks]
        row += [
            f"{run.parameters:,}",
            f"{run.nonzero_parameters:,}",
            f"{run.weight_bytes / 2**20:,.1f} MiB",
            _cell(run.predicted_speedup, ".2f", "×"),
            _cell(run.prefill_ms, ".1f"),
            _cell(run.decode_tokens_per_s, ".1f"),
            _cell(run.measured_speedup, ".2f", "×"),
        ]
        rows.append(row)
    return headers, rows


def _metric_name(runs: list[RunSummary], task: str) -> str:
    return headline_metric(next(run.scores[task] for run in runs if task in run.scores))
