"""Healing what structural pruning removes (smollm2-135m): width 30% (RL-Allocator), SPRINT 1.4x and joint evo
1.5x, each unhealed and healed with `lm`, `lora` and `kd` at the same token budget, the best method also at 4x
the tokens; Adapt-Accel (K stages) against one-shot + the same tokens for width rl; healed rl against healed
uniform width at the same ratio.

Every pruned model is one `compress` run directory; every healed row is `layerwise heal RUN` on it, so the
unhealed and healed rows share the exact pruned weights. Rows are evaluated on the full wiki split (140 windows)
and on zero-shot subsets. `--resume` skips finished rows and continues a row's healing from its checkpoint, so
the grid (tens of CPU hours on 2 cores) runs over several sessions; finished rows are also kept in
results/healing.carried.json, so a run whose DIR was lost with its machine resumes on a like machine without
measuring them again (see steps.py; a lost base is pruned again where a healed row needs its weights).

Run: `.venv/bin/python benchmarks/healing.py --out DIR [--resume]` alone on the machine (training speed is
reported); writes the `healing` section of benchmarks/RESULTS.md and results/healing.json from the rows finished
so far (`--rows a,b` runs only those; `--report` writes from what DIR holds).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import markdown_table, write_section  # noqa: E402
from steps import Steps  # noqa: E402

BASE_TOKENS = 2**18
LONG_TOKENS = 2**20
TASKS = ["arc_easy", "piqa", "hellaswag"]


@dataclass(frozen=True)
class Base:
    """A pruned model: the compress options that make it (the headline/joint tables' settings)."""

    label: str
    structure: str
    allocator: str
    budget: dict[str, Any]
    settings: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)


# FFN widths in multiples of 32, the row block of llama.cpp's legacy types (q4_0, q5_0, q8_0): with the default
# multiple of 8, three ffn_down tensors in four could not be quantized and llama.cpp would keep them f16
WIDTH_PARAMS = {"channel_multiple": 32}
BASES = {
    "width-rl": Base("width 30% rl", "width", "rl", {"pruning_ratio": 0.3}, {"nsamples": 32}, WIDTH_PARAMS),
    "width-uniform": Base("width 30% uniform", "width", "uniform", {"pruning_ratio": 0.3}, {"nsamples": 32},
                          WIDTH_PARAMS),
    "sprint": Base("SPRINT 1.4x", "depth", "sprint", {"target_speedup": 1.4}, {"nsamples": 8, "calib_seqlen": 256}),
    "joint": Base("joint evo 1.5x", "joint", "evo", {"target_speedup": 1.5},
                  {"nsamples": 2, "calib_seqlen": 128, "latency": {"repeats": 10}}, {"candidates": 181}),
}


@dataclass(frozen=True)
class Row:
    """One table row: a base, and how it is healed (None: unhealed)."""

    base: str
    method: Optional[str] = None
    tokens: int = 0
    stages: int = 1

    @property
    def name(self) -> str:
        if self.method is None:
            return f"{self.base}-unhealed"
        return f"{self.base}-{self.method}-{self.tokens}" + (f"-accel{self.stages}" if self.stages > 1 else "")


def rows(best: str = "kd", stages: int = 4) -> list[Row]:
    grid = []
    for base in ("width-rl", "sprint", "joint"):
        grid.append(Row(base))
        grid += [Row(base, method, BASE_TOKENS) for method in ("lm", "lora", "kd")]
    grid += [Row("width-rl", "kd", BASE_TOKENS, stages), Row("width-uniform"), Row("width-uniform", "kd", BASE_TOKENS)]
    grid += [Row(base, best, LONG_TOKENS) for base in ("width-rl", "sprint")]
    return grid


def run_row(row: Row, args: argparse.Namespace) -> Path:
    """The row's run directory, computing what is missing (a resumed row continues from its checkpoint)."""
    from layerwise import Budget, RunSettings
    from layerwise.config import HealSetting
    from layerwise.healing import checkpoint_dir, heal_run
    from layerwise.pipeline import compress

    base = BASES[row.base]
    out = args.out / row.name
    if (out / "result.json").is_file():
        return out
    evaluation = dict(max_windows=args.windows, tasks=args.tasks, task_limit=args.limit, seed=args.seed)
    heal = HealSetting(method=row.method, tokens=row.tokens, seed=args.seed) if row.method else None
    resume = args.resume and checkpoint_dir(out).is_dir()
    if row.stages > 1:  # Adapt-Accel: prune and heal in stages from the dense model
        settings = RunSettings(**evaluation, **base.settings, heal=heal)
        compress(args.model, Budget(**base.budget), None, base.allocator, settings, out, True,
                 structure=base.structure, iterative_steps=row.stages, **base.params)
    elif heal is None:
        settings = RunSettings(**evaluation, **base.settings)
        compress(args.model, Budget(**base.budget), None, base.allocator, settings, out, True,
                 structure=base.structure, **base.params)
    else:
        source = run_row(Row(row.base), args)
        heal_run(source, out, heal, None, True, resume)
    print(f"{row.name}: done", flush=True)
    return out


def summarize(row: Row, record: dict) -> dict[str, Any]:
    metrics = record["metrics"]
    healing = metrics.get("healing") or {}
    scores = ((metrics.get("zeroshot") or {}).get("scores")) or {}
    return {"base": BASES[row.base].label, "method": row.method or "unhealed", "tokens": row.tokens,
            "stages": row.stages, "ppl": metrics.get("ppl"), "dense_ppl": metrics.get("dense_ppl"),
            "accuracy": {task: scores.get(task, {}).get("acc_norm", scores.get(task, {}).get("acc"))
                         for task in TASKS},
            "tokens_per_s": healing.get("tokens_per_s"), "heal_s": healing.get("seconds"),
            "total_s": record["timings"].get("total_s"), "peak_rss_bytes": healing.get("peak_rss_bytes"),
            "bf16_autocast": healing.get("bf16_autocast"), "parameters": metrics.get("parameters"),
            "windows": (record.get("protocol") or {}).get("windows")}


def gap_closed(unhealed: float, healed: float, dense: float) -> float:
    """The fraction of the log-perplexity gap to dense that healing closed."""
    import math

    return (math.log(unhealed) - math.log(healed)) / (math.log(unhealed) - math.log(dense))


def goal_lines(entries: dict[str, dict]) -> list[str]:
    """Each goal of the issue, met or not met with its number, from the rows finished so far."""
    lines = []
    targets = {("width-rl", BASE_TOKENS): 0.60, ("sprint", BASE_TOKENS): 0.60, ("width-rl", LONG_TOKENS): 0.75,
               ("sprint", LONG_TOKENS): 0.75}
    for (base, tokens), share in targets.items():
        unhealed, healed = entries.get(Row(base).name), entries.get(Row(base, "kd", tokens).name)
        if unhealed is None or healed is None:
            lines.append(f"- kd closes ≥ {share:.0%} of {BASES[base].label}'s log-PPL gap at {tokens:,} tokens: "
                         "**not measured yet**.")
            continue
        closed = gap_closed(unhealed["ppl"], healed["ppl"], unhealed["dense_ppl"])
        verdict = "met" if closed >= share else "not met"
        lines.append(f"- kd closes ≥ {share:.0%} of {BASES[base].label}'s log-PPL gap at {tokens:,} tokens: "
                     f"{unhealed['ppl']:.2f} → {healed['ppl']:.2f} (dense {unhealed['dense_ppl']:.2f}), "
                     f"{closed:.0%} closed: **{verdict}**.")
    for base in ("width-rl", "sprint", "joint"):
        found = {m: entries.get(Row(base, m, BASE_TOKENS).name) for m in ("kd", "lm", "lora")}
        if any(v is None for v in found.values()):
            lines.append(f"- kd beats lm and lora on {BASES[base].label}: **not measured yet**.")
            continue
        ok = found["kd"]["ppl"] < min(found["lm"]["ppl"], found["lora"]["ppl"])
        lines.append(f"- kd beats lm and lora on {BASES[base].label} at {BASE_TOKENS:,} tokens: kd "
                     f"{found['kd']['ppl']:.2f}, lm {found['lm']['ppl']:.2f}, lora {found['lora']['ppl']:.2f}: "
                     f"**{'met' if ok else 'not met'}**.")
    pairs = [("Adapt-Accel beats one-shot + the same tokens (width rl)", Row("width-rl", "kd", BASE_TOKENS, 4),
              Row("width-rl", "kd", BASE_TOKENS)),
             ("healed RL-Allocator beats healed uniform width", Row("width-rl", "kd", BASE_TOKENS),
              Row("width-uniform", "kd", BASE_TOKENS))]
    for label, first, second in pairs:
        a, b = entries.get(first.name), entries.get(second.name)
        if a is None or b is None:
            lines.append(f"- {label}: **not measured yet**.")
        else:
            lines.append(f"- {label}: {a['ppl']:.2f} vs {b['ppl']:.2f}: **{'met' if a['ppl'] < b['ppl'] else 'not met'}**.")
    return lines


def write_results(entries: dict[str, dict], args: argparse.Namespace, planned: list[Row],
                  deployed: dict[str, Any], measured_at: str = "") -> None:
    """The section from the rows finished so far; ``measured_at`` names the commits when rows were measured at
    several."""
    from healing_deploy import deploy_markdown, plot, points

    table = []
    for row in planned:
        entry = entries.get(row.name)
        if entry is None:
            continue
        accuracy = " / ".join("-" if entry["accuracy"][t] is None else f"{100 * entry['accuracy'][t]:.1f}"
                              for t in TASKS)
        table.append([entry["base"], entry["method"] + (f" (Adapt-Accel K={row.stages})" if row.stages > 1 else ""),
                      f"{row.tokens:,}" if row.tokens else "-", f"{entry['ppl']:.2f}", accuracy,
                      f"{entry['tokens_per_s']:.0f}" if entry["tokens_per_s"] else "-",
                      f"{entry['total_s'] / 60:.0f}" if entry["total_s"] else "-",
                      f"{entry['peak_rss_bytes'] / 2**30:.1f}" if entry["peak_rss_bytes"] else "-"])
    done, total = sum(row.name in entries for row in planned), len(planned)
    dense = next((e["dense_ppl"] for e in entries.values() if e.get("dense_ppl")), None)
    found = points(deployed)
    figure = None
    if found:
        plot(found, Path(__file__).resolve().parent / "results" / "healing_deploy.png")
        figure = "results/healing_deploy.png"
    markdown = (
        "## Healing: distillation, LM loss and LoRA after structural pruning (smollm2-135m)\n\n"
        f"Command: `.venv/bin/python benchmarks/healing.py --out DIR --resume` ({done} of {total} rows finished)\n\n"
        "Each pruned model is one `compress` run (width: 32 calibration windows; SPRINT: 8 x 256 tokens; joint evo: "
        "the joint table's speed row); each healed row is `layerwise heal RUN --heal METHOD --heal-tokens N` on that "
        "run's saved weights, trained on the wiki calibration articles and Penn Treebank's train split (never the "
        "evaluation articles), batch 4 x 512, AdamW lr 1e-4, 5% warm-up then cosine to 1e-5, float32 (bf16 autocast "
        "is emulated on this AVX2 CPU and ran 3.6-4.9x slower). `kd`: KL divergence to the dense model's "
        "next-token distribution at temperature 1; `lm`: next-token cross-entropy; `lora`: rank-16 adapters on "
        "every decoder linear trained on the kd loss, merged. Adapt-Accel: `compress --iterative-steps K --heal kd` "
        f"from the dense model. Wiki PPL on {args.windows} windows (dense {dense if dense is None else f'{dense:.2f}'}); "
        f"accuracy (acc_norm where defined) on a seeded {args.limit}-item subset of "
        f"{', '.join(TASKS)}; tok/s = training tokens per second of the healing; time = the row's command; "
        "peak = the process's peak RSS.\n\n"
        + markdown_table(["pruned", "healing", "tokens", "wiki PPL", " / ".join(TASKS) + " (%)", "train tok/s",
                          "time (min)", "peak RSS (GiB)"], table)
        + "\n" + "\n".join(goal_lines(entries)) + "\n\n" + deploy_markdown(found, dense, figure)
    )
    write_section("healing", markdown, {"rows": entries, "deployment": deployed}, args.remark, measured_at)
    print(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=140)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=200, help="zero-shot items per task (seeded subset)")
    parser.add_argument("--stages", type=int, default=4, help="Adapt-Accel's K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="", help="comma-separated row names to run (default: every row)")
    parser.add_argument("--report", action="store_true", help="only write the section from finished rows")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--skip-deploy", action="store_true", help="do not quantize and deploy the healed models")
    parser.add_argument("--deploy-nsamples", type=int, default=32, help="calibration windows of the quantize stage")
    parser.add_argument("--remark", default="")
    args = parser.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.out.mkdir(parents=True, exist_ok=True)
    planned = rows(stages=args.stages)
    chosen = {name for name in args.rows.split(",") if name}
    steps = Steps("healing", args.out, resume=args.resume or args.report)

    def finished(row: Row) -> dict[str, Any]:
        return summarize(row, json.loads((run_row(row, args) / "result.json").read_text()))

    for row in planned:
        if (args.out / row.name / "result.json").is_file() or (not args.report and (not chosen or row.name in chosen)):
            steps.run(row.name, lambda r=row: finished(r))
    entries = {row.name: steps[row.name] for row in planned if row.name in steps}
    state_file = args.out / "deploy" / "state.json"
    if args.report or args.skip_deploy:
        deployed = json.loads(state_file.read_text()) if state_file.is_file() else {}
    else:
        from healing_deploy import deploy_rows

        deployed = deploy_rows(args, entries, {base: BASES[base].label for base in ("width-rl", "sprint", "joint")})
    write_results(entries, args, planned, deployed, steps.provenance_remark())
    if len(entries) == len(planned):
        steps.finish()


if __name__ == "__main__":
    main()
