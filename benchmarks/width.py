"""Width pruning benchmark (RL-Allocator / RL-Refine issue): uniform / adapt / rl / rl-refine on smollm2-135m
at pruning ratios 0.2 / 0.3 / 0.5, Taylor importance.

Run: `.venv/bin/python benchmarks/width.py --out DIR [--nsamples 32] [--resume]` on an otherwise idle machine
(speed is measured). Each point is a real `layerwise compress --structure width` run saved under DIR; writes
the `width` section of benchmarks/RESULTS.md and results/width.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import markdown_table, write_section  # noqa: E402

ALLOCATORS = ["uniform", "adapt", "rl", "rl-refine"]
PROXIES = ["flops", "weight_bytes", "peak_activation_bytes", "kv_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.3,0.5")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS))
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (Taylor uses their first 64 tokens)")
    parser.add_argument("--windows", type=int, default=30, help="wiki perplexity windows of 512 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--remark", default="")
    args = parser.parse_args()

    import layerwise
    from layerwise.pipeline import compress

    ratios = [float(r) for r in args.ratios.split(",")]
    allocators = args.allocators.split(",")
    settings = layerwise.RunSettings(max_windows=args.windows, nsamples=args.nsamples, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    records = {}
    for ratio in ratios:
        for allocator in allocators:
            run_dir = args.out / f"{allocator}-{ratio:g}"
            if not (args.resume and (run_dir / "result.json").is_file()):
                compress(args.model, layerwise.Budget.for_width(ratio), allocator=allocator, settings=settings,
                         out=run_dir, overwrite=True, structure="width")
                print(f"{allocator} at {ratio:g}: done", flush=True)
            records[(allocator, ratio)] = json.loads((run_dir / "result.json").read_text())
    write_results(records, ratios, allocators, args)


def write_results(records: dict, ratios: list[float], allocators: list[str], args: argparse.Namespace) -> None:
    rows = []
    first = next(iter(records.values()))
    dense_ppl = first["metrics"]["dense_ppl"]
    for (allocator, ratio), record in records.items():
        metrics, prediction = record["metrics"], record["plan"]["prediction"]
        normalised = prediction["normalised"]
        measured, predicted = metrics["speedup"] or {}, metrics["flop_speedup"]
        rows.append([f"{ratio:g}", allocator, f"{metrics['ppl']:.1f}",
                     *(f"{normalised[p]:.3f}" for p in PROXIES),
                     f"{predicted['prefill']:.2f} / {measured.get('prefill', float('nan')):.2f}",
                     f"{predicted['decode']:.2f} / {measured.get('decode', float('nan')):.2f}",
                     f"{metrics['latency']['decode_tokens_per_s']:.1f}",
                     f"{metrics['pruning_s']:.0f}", f"{record['timings']['plan_s']:.0f}"])
    setting = first["metrics"]["latency"]["setting"]
    dense_latency = first["metrics"]["dense"]["latency"]
    markdown = (
        "## Width pruning: uniform / adapt / RL-Allocator / RL-Refine (smollm2-135m)\n\n"
        f"Command: `.venv/bin/python benchmarks/width.py --out DIR --nsamples {args.nsamples} --seed {args.seed}`\n\n"
        f"Taylor importance (LLM-Pruner, element-wise first order) on {args.nsamples} wiki calibration windows cut "
        "to 64 tokens; heads pruned in whole KV groups (3 per layer), FFN channels in multiples of 8, every "
        "layer eligible; the pruning ratio is the fraction of the decoder's attention + MLP weights removed "
        "(matched within one rounding unit, 13,824 parameters). RL reward weights are the defaults "
        "(w_acc 1.0, α 0.2, β 0.6, γ 0.2, δ 0.4); accuracy term −ln(proxy PPL / dense proxy PPL) on 4 × 128 "
        f"calibration tokens; PPO, seed {args.seed}, 3000 steps (rl) / 320 moves (rl-refine). Wiki PPL on the "
        f"first {args.windows} evaluation windows of 512 tokens (dense {dense_ppl:.2f}). Costs are over the "
        f"dense model's for prompt {setting['prompt_length']} + {setting['generation_length']} generated tokens, "
        f"batch {setting['batch_size']}; speed is measured in the same run (2 CPU cores, fp32; dense prefill "
        f"{dense_latency['prefill_ms']:.0f} ms, decode {dense_latency['decode_tokens_per_s']:.1f} tokens/s). "
        "No recovery fine-tuning. Search = the allocator's wall time; plan = scoring + search.\n\n"
        + markdown_table(["ratio", "allocator", "wiki PPL", "FLOPs", "bytes", "peak act.", "KV cache",
                          "prefill speedup pred. / meas.", "decode speedup pred. / meas.", "decode tok/s",
                          "search (s)", "plan (s)"], rows)
        + "\n" + findings(records, ratios, allocators)
    )
    data = {f"{a}-{r:g}": {"metrics": rec["metrics"], "plan": rec["plan"], "timings": rec["timings"]}
            for (a, r), rec in records.items()}
    write_section("width", markdown, data, args.remark)


def findings(records: dict, ratios: list[float], allocators: list[str]) -> str:
    lines = []
    for first, second in (("rl-refine", "adapt"), ("rl", "uniform")):
        if first not in allocators or second not in allocators:
            continue
        verdicts = []
        for ratio in ratios:
            a, b = records[(first, ratio)]["metrics"]["ppl"], records[(second, ratio)]["metrics"]["ppl"]
            verdicts.append(f"{ratio:g}: {a:.1f} vs {b:.1f} ({'holds' if a <= b else 'does not hold'})")
        lines.append(f"- {first} not worse than {second} in perplexity: " + "; ".join(verdicts) + ".")
    if "rl-refine" in allocators:
        moves = []
        for ratio in ratios:
            details = records[("rl-refine", ratio)]["plan"]["details"]
            start, best = details["start_terms"], details["best_terms"]
            moves.append(f"{ratio:g}: {start['value']:.3f} → {best['value']:.3f} (proxy PPL {start['proxy_ppl']:.1f} → "
                         f"{best['proxy_ppl']:.1f})")
        lines.append("- rl-refine's objective on the search proxy, adapt start → best: " + "; ".join(moves) + ".")
    if "uniform" in allocators:
        kept = {ratio: sorted(set(records[("uniform", ratio)]["metrics"]["widths"]["groups"])) for ratio in ratios}
        lines.append("- uniform keeps the same number of KV groups in every layer (" + ", ".join(
            f"{ratio:g}: {'/'.join(map(str, groups))} of 3" for ratio, groups in kept.items())
            + "); the FFN absorbs the rest of the budget.")
    for allocator in allocators:
        ratio = max(ratios)
        metrics = records[(allocator, ratio)]["metrics"]
        predicted, measured = metrics["flop_speedup"]["decode"], (metrics["speedup"] or {}).get("decode")
        if measured is not None:
            share = measured / predicted
            lines.append(f"- {allocator} at {ratio:g}: measured decode speedup {measured:.2f}x is {share:.2f} of the "
                         f"FLOP-predicted {predicted:.2f}x ({'meets' if share >= 0.7 else 'misses'} the 0.7 target).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
