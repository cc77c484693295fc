"""Zero-shot benchmark (zero-shot issue): dense smollm2-135m and the best plan of each finished capability at
its headline budget, all scored on the same tasks, items and seed through lm-eval.

Run: `.venv/bin/python benchmarks/zeroshot.py --out DIR [--limit 500] [--resume]`. Each row is a real
`layerwise eval` / `layerwise compress` run saved under DIR (with its result.json); the comparison page is
written to DIR/report.html. Writes the `zeroshot` section of benchmarks/RESULTS.md and results/zeroshot.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import markdown_table, write_section  # noqa: E402

# (run name, capability, plan) — the plan's method/allocator/sparsity are the headline rows of RESULTS.md.
ROWS = [
    ("dense", "dense model", None),
    ("magnitude-uniform-50", "foundation: uniform magnitude at 50% (the demo)", ("magnitude", "uniform", 0.5)),
    ("sparsegpt-owl-50", "unstructured: best plan at 50% (SparseGPT + OWL)", ("sparsegpt", "owl", 0.5)),
    ("sparsegpt-alpha-70", "unstructured: best plan at 70%, the headline (SparseGPT + AlphaPruning)",
     ("sparsegpt", "alpha", 0.7)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory for the run directories and report")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="default")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: layerwise's default)")
    parser.add_argument("--windows", type=int, default=30, help="wiki perplexity windows (as the unstructured table)")
    parser.add_argument("--resume", action="store_true", help="keep run directories that already hold a result")
    parser.add_argument("--remark", default="")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table from the runs in --out")
    args = parser.parse_args()

    import layerwise
    from layerwise.config import DEFAULT_TASK_LIMIT
    from layerwise.pipeline import compress, evaluate_model
    from layerwise.report import summarize, write_report

    limit = args.limit or DEFAULT_TASK_LIMIT
    settings = layerwise.RunSettings(max_windows=args.windows, tasks=args.tasks.split(","), task_limit=limit)
    args.out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    for name, _, plan in ROWS:
        run_dir = args.out / name
        if (args.resume or args.report_only) and (run_dir / "result.json").is_file():
            continue
        started = time.perf_counter()
        if plan is None:
            evaluate_model(args.model, settings, run_dir, overwrite=True)
        else:
            method, allocator, sparsity = plan
            compress(args.model, layerwise.Budget.for_sparsity(sparsity), method, allocator, settings, run_dir,
                     overwrite=True)
        wall[name] = round(time.perf_counter() - started, 1)
        print(f"{name}: {wall[name]:.0f} s", flush=True)
    run_dirs = [args.out / name for name, _, _ in ROWS]
    write_report(run_dirs, args.out / "report.html")
    write_results([summarize(d) for d in run_dirs], args)


def write_results(runs: list, args: argparse.Namespace) -> None:
    from layerwise.evaluate import headline_metric
    from layerwise.report.tables import score_cell

    tasks = list(runs[0].scores)
    headers = ["run", "wiki PPL", *tasks, "mean"]
    rows = []
    for run in runs:
        cells = [score_cell(run.scores[t]) for t in tasks]
        mean = sum(run.scores[t][headline_metric(run.scores[t])] for t in tasks) / len(tasks)
        rows.append([run.name, f"{run.ppl:.2f}", *cells, f"{100 * mean:.1f}"])
    chance = [runs[0].scores[t]["chance"] for t in tasks]
    rows.append(["chance", "", *[f"{100 * c:.1f}" if c is not None else "0" for c in chance],
                 f"{100 * sum(c or 0 for c in chance) / len(chance):.1f}"])
    first = runs[0].record["metrics"]["zeroshot"]
    protocol = first["protocol"]
    items = ", ".join(f"{t} {runs[0].scores[t]['items']}" for t in tasks)
    metric = ", ".join(f"{t} {headline_metric(runs[0].scores[t])}" for t in tasks)
    seconds = {run.name: run.record["metrics"]["zeroshot"]["seconds"] for run in runs}
    dense_s = seconds[runs[0].name]
    markdown = (
        "## Zero-shot accuracy through lm-eval (smollm2-135m)\n\n"
        f"Command: `.venv/bin/python benchmarks/zeroshot.py --out DIR --limit {protocol['limit']}` "
        f"(DIR/report.html is the comparison page of these runs)\n\n"
        f"Data: {protocol['data_source']}, converted once into lm-eval local-file tasks; lm-eval "
        f"{protocol['lm_eval_version']}, zero-shot, fp32, the same seeded random items for every row "
        f"(seed {protocol['seed']}): {items}. Accuracy in % ± standard error; metric: {metric}. "
        f"wiki PPL on the first {args.windows} evaluation windows of 512 tokens, as in the unstructured table.\n\n"
        + markdown_table(headers, rows)
        + "\n"
        + "".join(f"- **{name}**: {what}\n" for name, what, _ in ROWS)
        + f"\nScoring time for one model (dense, default tasks and limit): {dense_s:.0f} s on 2 CPU cores "
        f"(target: under 15 minutes).\n"
    )
    data = {"protocol": protocol, "runs": {run.name: run.record["metrics"] for run in runs}, "seconds": seconds}
    write_section("zeroshot", markdown, data, args.remark)


if __name__ == "__main__":
    main()
