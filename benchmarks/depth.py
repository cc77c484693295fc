"""Depth pruning benchmark (SPRINT issue): sprint / sleb / shortgpt / drop-last on smollm2-135m at target
speedups 1.2 / 1.4 / 1.6 (one search per method up to the largest target, evaluated on the way).

Run: `.venv/bin/python benchmarks/depth.py --out DIR [--nsamples 16 --calib-seqlen 256] [--resume]`. Run it
on an otherwise idle machine: speedups are measured. Each method is a real `layerwise compress
--structure depth` run saved under DIR; writes the `depth` section of benchmarks/RESULTS.md and
results/depth.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import markdown_table, read_results, write_section  # noqa: E402

METHODS = ["sprint", "sleb", "shortgpt", "drop-last"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="1.2,1.4,1.6")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows for the searches")
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--windows", type=int, default=30, help="wiki perplexity windows of 512 tokens")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--merge", action="store_true",
                        help="rerun only --methods; keep every other method's rows from results/depth.json, and the "
                             "rerun methods' previous rows under '<method> (previous)'")
    parser.add_argument("--previous-label", default="previous",
                        help="with --merge: what the kept earlier rows of a rerun method are called")
    parser.add_argument("--report-only", action="store_true", help="only write the table from results/depth.json")
    parser.add_argument("--remark", default="")
    args = parser.parse_args()

    targets = [float(t) for t in args.targets.split(",")]
    if args.report_only:
        saved = read_results("depth")
        write_results(saved, targets, args)
        return

    import layerwise
    from layerwise.pipeline import compress

    targets = [float(t) for t in args.targets.split(",")]
    settings = layerwise.RunSettings(max_windows=args.windows, nsamples=args.nsamples,
                                     calib_seqlen=args.calib_seqlen)
    args.out.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        run_dir = args.out / method
        if args.resume and (run_dir / "result.json").is_file():
            continue
        compress(args.model, layerwise.Budget.for_depth(max(targets)), allocator=method, settings=settings,
                 out=run_dir, overwrite=True, structure="depth", eval_speedups=targets[:-1])
        print(f"{method}: done", flush=True)
    records = {m: json.loads((args.out / m / "result.json").read_text()) for m in args.methods.split(",")}
    if args.merge:
        saved = read_results("depth")
        merged = {}
        for method, record in saved.items():
            if method in records:
                merged[method] = records[method]
                merged[f"{method} ({args.previous_label})"] = record
            elif "(" not in method:  # an older kept row is not carried twice
                merged[method] = record
        records = {**merged, **{m: r for m, r in records.items() if m not in merged}}
    write_results(records, targets, args)


def points(record: dict, last_target: float) -> list[dict]:
    """The evaluated steps of one search: its milestones, then the final model (applied and reloaded)."""
    metrics = record["metrics"]
    steps = [{**m, "target": m["milestones"][0]} for m in metrics["milestones"]]
    final = {"target": (record.get("budget") or {}).get("target_speedup") or last_target, "removed": metrics["removed_sublayers"],
             "predicted_speedup": metrics["predicted_speedup"], "pruning_s": metrics["pruning_s"],
             "ppl": metrics["ppl"], "speedup": metrics["speedup"]}
    return steps + [final]


def write_results(records: dict[str, dict], targets: list[float], args: argparse.Namespace) -> None:
    rows, summary = [], {}
    dense_ppl = next(iter(records.values()))["metrics"]["dense_ppl"]
    for method, record in records.items():
        for point in points(record, max(targets)):
            speedup = point["speedup"] or {}
            rows.append([method, f"{point['target']:.1f}", len(point["removed"]), f"{point['predicted_speedup']:.2f}",
                         f"{speedup.get('total', float('nan')):.2f}", f"{speedup.get('prefill', float('nan')):.2f}",
                         f"{speedup.get('decode', float('nan')):.2f}", f"{point['ppl']:.2f}", f"{point['pruning_s']:.1f}"])
            summary[(method, point["target"])] = point
    table = records[next(iter(records))]["plan"]["prediction"]["latency_table"]
    setting = table["setting"]
    markdown = (
        "## Depth pruning: SPRINT vs SLEB / ShortGPT / drop-last (smollm2-135m)\n\n"
        f"Command: `.venv/bin/python benchmarks/depth.py --out DIR --nsamples {args.nsamples} "
        f"--calib-seqlen {args.calib_seqlen}`\n\n"
        f"One search per method up to {max(targets)}x predicted speedup, evaluated when the prediction first "
        f"reaches each target. Deployment setting: prompt {setting['prompt_length']} tokens + "
        f"{setting['generation_length']} generated, batch {setting['batch_size']}, median of {setting['repeats']} "
        f"(2 CPU cores, fp32). Latency table: whole model {table['total_ms']:.0f} ms, one attention sublayer "
        f"{table['sublayer_ms']['attention']:.1f} ms, one MLP {table['sublayer_ms']['mlp']:.1f} ms. Calibration: "
        f"{args.nsamples} x {args.calib_seqlen} wiki tokens; wiki PPL on the first {args.windows} evaluation "
        f"windows of 512 tokens (dense {dense_ppl:.2f}). Measured speedup = dense / pruned time of the whole "
        "setting, same run; pruning time = search time until that point (evaluations excluded).\n\n"
        + markdown_table(["method", "target", "removed", "predicted", "measured", "prefill", "decode", "wiki PPL",
                          "pruning (s)"], rows)
        + "\n" + findings(summary, records, targets)
    )
    data = {m: {"metrics": r["metrics"], "plan": r["plan"], "budget": r.get("budget")} for m, r in records.items()}
    write_section("depth", markdown, data, args.remark)


def findings(summary: dict, records: dict, targets: list[float]) -> str:
    lines = []
    for target in targets:
        ranked = sorted((m for m in records if (m, target) in summary), key=lambda m: summary[(m, target)]["ppl"])
        lines.append(f"- at {target:.1f}x: best perplexity {ranked[0]} ({summary[(ranked[0], target)]['ppl']:.2f}); "
                     + ", ".join(f"{m} {summary[(m, target)]['ppl']:.2f}" for m in ranked[1:]))
    for method in (m for m in records if m.startswith("sprint (")):
        for target in targets:
            if ("sprint", target) in summary and (method, target) in summary:
                ours, other = summary[("sprint", target)]["ppl"], summary[(method, target)]["ppl"]
                lines.append(f"- at {target:.1f}x, sprint {ours:.2f} vs {method} {other:.2f}: our defaults are "
                             f"{'better' if ours < other else 'worse'}.")
    if "sprint" in records and "sleb" in records:
        sprint_s, sleb_s = records["sprint"]["metrics"]["pruning_s"], records["sleb"]["metrics"]["pruning_s"]
        holds = "holds" if sprint_s < sleb_s else "does not hold"
        lines.append(f"- sprint searches faster than sleb: {sprint_s:.0f} s vs {sleb_s:.0f} s to {max(targets)}x: {holds}.")
    off = []
    for (method, target), point in summary.items():
        measured = (point["speedup"] or {}).get("total")
        if measured is not None and abs(measured / target - 1) > 0.10:
            off.append(f"{method}@{target:.1f} ({measured:.2f}x)")
    lines.append("- measured speedup within 10% of the target: "
                 + ("all points." if not off else "not for " + ", ".join(off) + "."))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
