"""Joint search benchmark (issue 19): at a byte budget (the size of the model stored uniformly as q4_k, with
llama.cpp's fallbacks, embedding q8_0) and at a 1.5x predicted speedup, the best single-action plans against
the joint searchers (evo, rl, greedy) at an equal number of candidate evaluations. Every speed row goes through the
same measured speed guard (SPRINT's and the joint searches' in the library, width's here with the same rounds).

Run: `.venv/bin/python benchmarks/joint.py --out DIR [--resume]` on an otherwise idle machine (speed is
measured). Every row is a real `compress` run saved under DIR, evaluated on the full wiki split (140 windows);
byte-budget plans are also exported to GGUF and their tensor bytes read back from the file. Writes the `joint`
section of benchmarks/RESULTS.md and results/joint.json. A finished row's result is also kept in
results/joint.carried.json while the run spans sessions: `--resume` continues from DIR or, on a like machine, from
that file (see steps.py)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import markdown_table, write_section  # noqa: E402
from steps import Steps  # noqa: E402

TYPES = "f16,q8_0,q6_k,q5_k,q4_k,q3_k"
SEARCHERS = ["evo", "rl", "greedy"]


def q4_k_bytes(model: str) -> int:
    """GGUF tensor bytes of ``model`` with every decoder linear asked to be q4_k (llama.cpp's fallbacks where the
    rows do not fit) and a q8_0 embedding: the budget a Q4_K-sized file has."""
    import layerwise
    from layerwise.export.gguf_export import non_linear_bytes
    from layerwise.gguf import stored_type
    from layerwise.models import decoder_linears

    dense = layerwise.load(model).model
    return non_linear_bytes(dense, "q8_0") + sum(stored_type("q4_k", m.in_features).nbytes(m.out_features, m.in_features)
                                                 for m in decoder_linears(dense).values())


def file_bytes(model: str, record: dict) -> int:
    """Apply the run's plan to a fresh model, export it, and sum the GGUF file's tensor bytes."""
    from gguf import GGUFReader

    import layerwise
    from layerwise.export.gguf_export import export_gguf

    fresh = layerwise.load(model)
    layerwise.apply(fresh.model, layerwise.Plan.model_validate(record["plan"]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.gguf"
        export_gguf(fresh, path)
        return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=140)
    parser.add_argument("--speedup", type=float, default=1.5)
    parser.add_argument("--bytes-candidates", type=int, default=481, help="greedy's probes on this space, plus one")
    parser.add_argument("--speed-candidates", type=int, default=181)
    parser.add_argument("--width-ratio", type=float, default=0.4, help="width-only RL: the ratio measured near 1.5x")
    parser.add_argument("--joint-windows", type=int, default=2, help="calibration windows of 128 tokens the joint "
                        "searches score candidates on")
    parser.add_argument("--long-candidates", type=int, default=0, help="also run evo and rl with this many "
                        "evaluations at both budgets (a scaling check beside the equal-count comparison)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-repeats", type=int, default=10, help="paired runs (dense and plan alternating) "
                        "behind each measured speedup, the speed guard's included")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--remark", default="")
    args = parser.parse_args()

    from layerwise import Budget, LatencySetting, RunSettings

    def settings(**fields) -> RunSettings:
        """Every row measures its speedup the same way."""
        return RunSettings(latency=LatencySetting(repeats=args.latency_repeats), **fields)

    max_bytes = q4_k_bytes(args.model)
    joint = settings(max_windows=args.windows, nsamples=args.joint_windows, calib_seqlen=128, seed=args.seed)
    runs = {
        ("speed", "sprint (removal only)"): dict(budget=Budget.for_depth(args.speedup), structure="depth",
                                                 allocator="sprint", settings=settings(
                                                     max_windows=args.windows, nsamples=8, calib_seqlen=256,
                                                     seed=args.seed)),
        ("speed", f"rl (width only, ratio {args.width_ratio:g})"): dict(
            budget=Budget.for_width(args.width_ratio), structure="width", allocator="rl", guarded_ratio=True,
            settings=settings(max_windows=args.windows, nsamples=32, seed=args.seed)),
        **{("speed", f"joint {s}"): dict(budget=Budget.for_joint(None, args.speedup), structure="joint", allocator=s,
                                         candidates=args.speed_candidates, settings=joint) for s in SEARCHERS},
        ("bytes", "uniform q4_k (quant only)"): dict(budget=Budget.for_bits(16.0), structure="quant",
                                                     allocator="uniform", bits="q4_k",
                                                     settings=settings(max_windows=args.windows, seed=args.seed)),
        ("bytes", "greedy (quant only)"): dict(budget=Budget.for_bits(None, max_bytes), structure="quant",
                                               allocator="greedy", bits=TYPES, sensitivity="error",
                                               settings=settings(max_windows=args.windows, nsamples=32, seed=args.seed)),
        **{("bytes", f"joint {s}"): dict(budget=Budget.for_joint(max_bytes, None), structure="joint", allocator=s,
                                         candidates=args.bytes_candidates, settings=joint) for s in SEARCHERS},
    }
    if args.long_candidates:
        for budget, target in (("speed", Budget.for_joint(None, args.speedup)), ("bytes", Budget.for_joint(max_bytes, None))):
            for s in ("evo", "rl"):
                runs[(budget, f"joint {s} ×{args.long_candidates}")] = dict(
                    budget=target, structure="joint", allocator=s, candidates=args.long_candidates, settings=joint)
    steps = Steps("joint", args.out, args.resume)
    records = {}
    for (budget, label), run in runs.items():
        run = dict(run)
        if run.pop("guarded_ratio", False):
            records[(budget, label)] = guarded_width(args, budget, label, run, max_bytes, steps)
        else:
            records[(budget, label)] = run_row(args, budget, label, run, max_bytes, steps)
    write_results(records, max_bytes, args, steps.provenance_remark())
    steps.finish()


SPEED_TOLERANCE = 0.05  # a speed budget is honoured when the plan measures at least 95% of it


def guarded_width(args: argparse.Namespace, budget: str, label: str, run: dict, max_bytes: int,
                  steps: Steps) -> dict:
    """Width pruning's rows get the speed guard the library gives depth and the joint search (its budget is a
    ratio, not a speedup, so the guard runs here): the same rounds and the same paired measurement, and when the
    plan measures short of the target the ratio is raised so that the time saved grows by the error. The row is
    the last round's; its plan records every round like the others' guards."""
    from layerwise import Budget
    from layerwise.structures.speed_guard import GUARD_ROUNDS

    ratio, history, record = args.width_ratio, [], {}
    for attempt in range(GUARD_ROUNDS):
        suffix = "" if attempt == 0 else f"-guard{attempt + 1}"
        record = run_row(args, budget, label, {**run, "budget": Budget.for_width(ratio)}, max_bytes, steps, suffix)
        measured = record["metrics"]["speedup"]["total"]
        history.append({"ratio": round(ratio, 4), "measured": round(measured, 4), "budget": args.speedup})
        if measured >= args.speedup or attempt == GUARD_ROUNDS - 1:
            break
        ratio = min(0.95, ratio * (1 - 1 / args.speedup) / (1 - 1 / measured))
    record["plan"].setdefault("details", {})["speed_guard"] = history
    return record


def honours(entry: dict, budget: str, max_bytes: int, speedup: float) -> bool:
    """Whether a row keeps its budget: exported bytes at most the byte budget, or a measured speedup at least 95%
    of the target. The goal compares plans at the same budget, so a plan short of it is no fair best."""
    if budget == "bytes":
        return entry["file_bytes"] is not None and entry["file_bytes"] <= max_bytes
    return entry["measured_speedup"] is not None and entry["measured_speedup"] >= (1 - SPEED_TOLERANCE) * speedup


def measured_note(entry: dict, budget: str) -> str:
    return f", measured {entry['measured_speedup']:.2f}x" if budget == "speed" and entry["measured_speedup"] else ""


def run_row(args: argparse.Namespace, budget: str, label: str, run: dict, max_bytes: int, steps: Steps,
            suffix: str = "") -> dict:
    """One row's `compress` run under DIR, its exported bytes read back at the byte budget; a finished row's
    result is a step, kept in DIR and carried with the run (see steps.py)."""
    from layerwise.pipeline import compress

    run_dir = args.out / f"{budget}-{label.split(' (')[0].replace(' ', '-')}{suffix}"

    def measure() -> dict:
        options = dict(run)
        compress(args.model, options.pop("budget"), allocator=options.pop("allocator"),
                 settings=options.pop("settings"), out=run_dir, overwrite=True, structure=options.pop("structure"),
                 **options)
        record = json.loads((run_dir / "result.json").read_text())
        if budget == "bytes":
            record["file_bytes"] = file_bytes(args.model, record)
        return record

    return steps.run(run_dir.name, measure)


def guard_line(rounds: list[dict], repair_evaluations: int | None) -> str:
    """One guard's rounds in words: each measurement, what it was planned under, how it was planned again."""
    def one(r: dict) -> str:
        planned = (f"width ratio {r['ratio']:.3f}" if "ratio" in r
                   else f"predicted {r['predicted']:.2f}x under a {r['budget']:.2f}x budget")
        return f"{r['measured']:.2f}x ({planned})"

    again = len(rounds) - 1
    how = (f"; planned again {again}x" + (f", {repair_evaluations} repair evaluations counted as candidates"
                                          if repair_evaluations else "") if again else "; not planned again")
    return "measured " + " → ".join(one(r) for r in rounds) + how


def write_results(records: dict, max_bytes: int, args: argparse.Namespace, measured_at: str = "") -> None:
    """The section and its JSON; ``measured_at`` names the commits when rows were measured at several."""
    rows, data = [], []
    for (budget, label), record in records.items():
        metrics, plan = record["metrics"], record["plan"]
        details = plan.get("details", {})
        speedup = (metrics.get("speedup") or {}).get("total")
        predicted = plan["prediction"].get("predicted_speedup") or plan["prediction"].get("speedup")
        # every scored candidate counts, the speed guard's repair steps included
        evaluations = (None if details.get("evaluations") is None
                       else details["evaluations"] + (details.get("repair_evaluations") or 0))
        entry = {"budget": budget, "plan": label, "ppl": metrics["ppl"], "file_bytes": record.get("file_bytes"),
                 "measured_speedup": speedup, "predicted_speedup": predicted, "evaluations": evaluations,
                 "plan_s": record["timings"]["plan_s"], "calibration_kl": plan["prediction"].get("calibration_kl"),
                 "candidate_cost_ratio": plan["prediction"].get("candidate_cost_ratio"),
                 "curve": details.get("curve"), "levels": details.get("levels"),
                 "speed_guard": details.get("speed_guard"), "repair_evaluations": details.get("repair_evaluations")}
        data.append(entry)
        rows.append([budget, label, f"{metrics['ppl']:.2f}",
                     f"{record['file_bytes']:,}" if record.get("file_bytes") else "-",
                     f"{predicted:.2f} / {speedup:.2f}" if predicted and speedup else f"- / {speedup:.2f}" if speedup else "-",
                     str(evaluations) if evaluations is not None else "-",
                     f"{entry['calibration_kl']:.4f}" if entry["calibration_kl"] is not None else "-",
                     f"{record['timings']['plan_s']:.0f}"])
    by = {(e["budget"], e["plan"]): e for e in data}
    dense = next(iter(records.values()))["metrics"]["dense_ppl"]
    findings = []
    for budget in ("bytes", "speed"):
        singles = [e for e in data if e["budget"] == budget and not e["plan"].startswith("joint")]
        joints = [e for e in data if e["budget"] == budget and e["plan"].startswith("joint") and "×" not in e["plan"]]
        longer = [e for e in data if e["budget"] == budget and "×" in e["plan"]]
        best_joint = min(joints, key=lambda e: e["ppl"])
        honouring = [e for e in singles if honours(e, budget, max_bytes, args.speedup)]
        for against, pool in (("the best single-action plan within the budget", honouring),
                              ("the best single-action row, within the budget or not", singles)):
            if not pool or (pool is singles and len(honouring) == len(singles)):
                continue
            best_single = min(pool, key=lambda e: e["ppl"])
            gain = 1 - best_joint["ppl"] / best_single["ppl"]
            findings.append(f"- {budget}: best joint ({best_joint['plan']}, {best_joint['ppl']:.2f}) vs {against} "
                            f"({best_single['plan']}, {best_single['ppl']:.2f}{measured_note(best_single, budget)}): "
                            f"perplexity {abs(gain):.1%} {'lower' if gain >= 0 else 'higher'}; goal ≥ 10% lower: "
                            f"**{'met' if gain >= 0.10 else 'not met'}**"
                            + (f" (out of reach here: 10% below {best_single['ppl']:.2f} is below the dense model's "
                               f"{dense:.2f})." if 0.9 * best_single["ppl"] < dense else "."))
        if longer:
            best_long = min(longer, key=lambda e: e["ppl"])
            findings.append(f"- {budget}, longer searches: {best_long['plan']} {best_long['ppl']:.2f} "
                            f"({1 - best_long['ppl'] / best_single['ppl']:+.1%} against the best single-action plan).")
        suffixes = [""] + sorted({e["plan"].split("×")[1] for e in longer if e["plan"].startswith("joint evo")})
        for suffix in suffixes:
            evo = by.get((budget, "joint evo" + (f" ×{suffix}" if suffix else "")))
            rl = by.get((budget, "joint rl" + (f" ×{suffix}" if suffix else "")))
            if not (evo and rl and evo["curve"] and rl["curve"]):
                continue
            target = rl["calibration_kl"]
            reached = next((n for n, best in evo["curve"] if best <= target + 1e-12), None)
            half = rl["evaluations"] / 2
            stuck = rl["curve"] and rl["curve"][0][1] <= target + 1e-12
            findings.append(f"- {budget}: {evo['plan']} reaches {rl['plan']}'s best calibration KL ({target:.4f}) after "
                            f"{reached if reached is not None else 'never within'} of its {rl['evaluations']} "
                            f"evaluations; goal ≤ ½: **{'met' if reached is not None and reached <= half else 'not met'}**"
                            + (" (trivially: rl never improved on the uniform start both share)." if stuck else "."))
        for e in joints + longer + singles:
            if budget == "bytes" and e["file_bytes"] is not None:
                findings.append(f"- {budget}: {e['plan']}: {e['file_bytes']:,} tensor bytes in the exported file "
                                f"(budget {max_bytes:,}): **{'honoured' if honours(e, budget, max_bytes, args.speedup) else 'over'}**.")
            if budget == "speed" and e["measured_speedup"]:
                off = e["measured_speedup"] / args.speedup - 1
                findings.append(f"- {budget}: {e['plan']}: measured {e['measured_speedup']:.2f}x for the {args.speedup}x "
                                f"budget ({off:+.1%}); honoured within 5% (at least {0.95 * args.speedup:.3g}x): "
                                f"**{'yes' if honours(e, budget, max_bytes, args.speedup) else 'no'}**"
                                + ("; it measures more than 5% faster than asked" if off > SPEED_TOLERANCE else "") + ".")
    for e in data:
        if e["speed_guard"]:
            findings.append(f"- speed guard of {e['plan']}: {guard_line(e['speed_guard'], e['repair_evaluations'])}.")
    costs = [(e["budget"], e["plan"], e["candidate_cost_ratio"]) for e in data if e["candidate_cost_ratio"] is not None]
    findings.append("- Candidate cost against a warm dense pass over the same tokens (median full-stage candidate, swap "
                    "and first-use quantization of its levels included): "
                    + ", ".join(f"{b} {p.removeprefix('joint ')} {r:.3f}x" for b, p, r in costs)
                    + f"; goal ≤ 1.2x: **{'met' if max(r for *_, r in costs) <= 1.2 else 'not met'}** "
                    "(a narrower candidate is cheaper than the dense pass; greedy's probes each build a new level).")
    first = next(iter(records.values()))
    from layerwise.structures.speed_guard import GUARD_ROUNDS

    markdown = (
        "## Joint search: widths, removal and GGUF types under one budget (smollm2-135m)\n\n"
        f"Command: `.venv/bin/python benchmarks/joint.py --out DIR` (seed {args.seed})\n\n"
        f"Budgets: **bytes** = {max_bytes:,} GGUF tensor bytes (every decoder linear asked q4_k with llama.cpp's "
        "fallbacks, q8_0 embedding: a Q4_K-sized file); **speed** = "
        f"{args.speedup}x predicted speedup (prompt 128 + 32 generated, PyTorch latency tables measured at the start "
        f"of each run); measured speedup: the median ratio of {args.latency_repeats} paired runs, dense and plan "
        "alternating, in the speed guard and in the result. Joint space per block: attention keeps 3/2/1 KV groups or goes, MLP keeps 1536/1024/512 "
        f"channels or goes, each kept sublayer one of {TYPES} (speed budget: f16 only, narrower types save no "
        f"PyTorch time). Joint objective: KL to the dense model on {args.joint_windows} x 128 calibration tokens (evo's "
        f"first step: 1 window); every joint searcher gets the same evaluations ({args.bytes_candidates} at the byte budget, "
        f"{args.speed_candidates} at the speed budget: greedy's probes plus one). Single-action rows: uniform q4_k "
        "and the greedy GGUF-type allocator (error sensitivity, 32 x 512 calibration) at the same bytes; SPRINT at "
        f"the same predicted speedup; RL-Allocator width pruning starting at ratio {args.width_ratio:g}. Every "
        f"speed row goes through the same measured guard: up to {GUARD_ROUNDS} paired measurements of the plan, and after one "
        "short of the target a plan for a budget raised by the error (SPRINT and the joint searches: the predicted "
        "speedup × predicted / measured; width: the ratio scaled so the time saved grows by the error); the "
        f"candidates column counts the guard's repair evaluations too. Wiki PPL on all {args.windows} windows (dense "
        f"{first['metrics']['dense_ppl']:.2f}); bytes read back from each plan's exported GGUF file.\n\n"
        + markdown_table(["budget", "plan", "wiki PPL", "GGUF tensor bytes", "speedup pred. / meas.",
                          "candidates", "calib. KL", "plan (s)"], rows)
        + "\n\n" + "\n".join(findings) + "\n")
    write_section("joint", markdown, data, args.remark, measured_at)


if __name__ == "__main__":
    main()
