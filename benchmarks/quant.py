"""Weight quantization benchmark (AutoMP-RL issue) on smollm2-135m: dense; RTN W8/W4/W3 (asymmetric and
symmetric, groups of 128 with a shorter last group of 64 on 576-wide inputs); GPTQ W4 (plain and act-order);
AWQ W4; greedy and automp-rl at 4.25 and 5 average bits and automp-rl unconstrained (choices 3/4/8), the RL rows
over several seeds.

Run: `.venv/bin/python benchmarks/quant.py --out DIR [--seeds 3] [--resume]` on an otherwise idle machine (decode
speed is measured). Each row is a real `layerwise compress --structure quant` run saved under DIR; writes the
`quant` section of benchmarks/RESULTS.md and results/quant.json. The llmcompressor peer rows come from
`make bench-peers` (benchmarks/quant_peers.py), in their own section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import markdown_table, write_section  # noqa: E402

# name -> (method, allocator, avg_bits, options, searched over seeds)
ROWS: dict[str, tuple[str, str, float | None, dict, bool]] = {
    "RTN W8 g128": ("rtn", "uniform", None, {"bits": "8"}, False),
    "RTN W4 g128": ("rtn", "uniform", None, {"bits": "4"}, False),
    "RTN W4 g128 sym": ("rtn", "uniform", None, {"bits": "4", "symmetric": True}, False),
    "RTN W4 g64 sym": ("rtn", "uniform", None, {"bits": "4", "symmetric": True, "group_size": 64}, False),
    "RTN W4 g32 (Q4_1's own grid)": ("rtn", "uniform", None, {"bits": "4", "group_size": 32}, False),
    "RTN W3 g128": ("rtn", "uniform", None, {"bits": "3"}, False),
    "RTN W3 g128 sym": ("rtn", "uniform", None, {"bits": "3", "symmetric": True}, False),
    "GPTQ W4 g128 (plain)": ("gptq", "uniform", None, {"bits": "4", "act_order": False}, False),
    "GPTQ W4 g128 act-order": ("gptq", "uniform", None, {"bits": "4"}, False),
    "GPTQ W4 g64 sym act-order": ("gptq", "uniform", None, {"bits": "4", "symmetric": True, "group_size": 64}, False),
    "AWQ W4 g128 (RTN)": ("rtn", "uniform", None, {"bits": "4", "awq": True}, False),
    "greedy 4.25": ("rtn", "greedy", 4.25, {"bits": "3,4,8"}, False),
    "greedy 4.25 (4/8)": ("rtn", "greedy", 4.25, {"bits": "4,8"}, False),
    "greedy 5": ("rtn", "greedy", 5.0, {"bits": "3,4,8"}, False),
    "automp-rl 4.25": ("rtn", "automp-rl", 4.25, {"bits": "3,4,8"}, True),
    "automp-rl 5": ("rtn", "automp-rl", 5.0, {"bits": "3,4,8"}, True),
    "automp-rl unconstrained": ("rtn", "automp-rl", None, {"bits": "3,4,8"}, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--windows", type=int, default=30, help="wiki perplexity windows of 512 tokens")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the RL rows (0, 1, ...)")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--remeasure-latency", action="store_true",
                        help="load every saved run under --out and measure decode speed again (the dense model "
                             "once), on an idle machine; updates each result.json and rewrites the table")
    parser.add_argument("--merge", action="store_true",
                        help="rerun only --rows and keep every other row of results/quant.json as it is")
    parser.add_argument("--remark", default="")
    args = parser.parse_args()
    if args.remeasure_latency:
        remeasure_latency(args)

    import layerwise
    from layerwise.config import LatencySetting
    from layerwise.pipeline import compress

    args.out.mkdir(parents=True, exist_ok=True)
    latency = LatencySetting(repeats=3)
    records: dict[str, list[dict]] = {}
    for name, run_dirs in _run_dirs(args).items():
        method, allocator, avg_bits, options, searched = ROWS[name]
        params = {**options, **({"episodes": args.episodes} if allocator == "automp-rl" else {})}
        for seed, run_dir in enumerate(run_dirs):
            if not ((args.resume or args.remeasure_latency) and (run_dir / "result.json").is_file()):
                settings = layerwise.RunSettings(max_windows=args.windows, nsamples=args.nsamples, seed=seed,
                                                 latency=latency)
                compress(args.model, layerwise.Budget(avg_bits=avg_bits), method=method, allocator=allocator,
                         settings=settings, out=run_dir, overwrite=True, structure="quant", **params)
                print(f"{name} seed {seed}: done", flush=True)
            records.setdefault(name, []).append(json.loads((run_dir / "result.json").read_text()))
    if args.merge:
        saved = json.loads((Path(__file__).resolve().parent / "results" / "quant.json").read_text())
        kept = {name: [{"metrics": m, "timings": m["timings"]} for m in runs] for name, runs in saved.items()}
        records = {name: records.get(name) or kept[name] for name in ROWS if name in records or name in kept}
    write_results(records, args)


def _run_dirs(args: argparse.Namespace) -> dict[str, list[Path]]:
    return {name: [args.out / f"{name.replace(' ', '_').replace('/', '-')}-seed{seed}"
                   for seed in range(args.seeds if ROWS[name][4] else 1)] for name in args.rows.split(",")}


def remeasure_latency(args: argparse.Namespace) -> None:
    """Speed again from the saved models, one after another with nothing else running: the searches' own
    measurements share the machine with whatever else ran meanwhile."""
    import layerwise
    from layerwise.config import LatencySetting
    from layerwise.cost import measure_latency

    setting = LatencySetting(repeats=3)
    dense = measure_latency(layerwise.load(args.model).model, setting).model_dump()
    for run_dirs in _run_dirs(args).values():
        for run_dir in run_dirs:
            record = json.loads((run_dir / "result.json").read_text())
            record["metrics"]["latency"] = measure_latency(layerwise.load(str(run_dir)).model, setting).model_dump()
            record["metrics"]["dense"]["latency"] = dense
            record["metrics"]["latency_remeasured"] = True
            (run_dir / "result.json").write_text(json.dumps(record, indent=2))
            print(f"{run_dir.name}: {record['metrics']['latency']['decode_tokens_per_s']:.1f} tok/s", flush=True)


def _spread(values: list[float], spec: str) -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def write_results(records: dict[str, list[dict]], args: argparse.Namespace) -> None:
    first = next(iter(records.values()))[0]
    dense = first["metrics"]["dense"]
    dense_tps = dense["latency"]["decode_tokens_per_s"]
    rows = [["dense (fp32 in memory; 16-bit reference)", "16", f"{first['metrics']['dense_ppl']:.2f}",
             f"{2 * first['metrics']['quantized_weights'] / 2**20:.1f}", "-", f"{dense['weight_bytes'] / 2**20:.1f}",
             f"{dense_tps:.1f}", "-", "-"]]
    for name, runs in records.items():
        metrics = [r["metrics"] for r in runs]
        search = [r["timings"]["plan_s"] for r in runs]
        rows.append([name + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""),
                     _spread([m["avg_bits"] for m in metrics], ".3f"),
                     _spread([m["ppl"] for m in metrics], ".2f"),
                     _spread([m["quantized_bytes"] / 2**20 for m in metrics], ".2f"),
                     _spread([100 * m["memory_reduction_vs_16bit"] for m in metrics], ".1f") + "%",
                     _spread([m["weight_bytes"] / 2**20 for m in metrics], ".1f"),
                     _spread([m["latency"]["decode_tokens_per_s"] for m in metrics], ".1f"),
                     _spread(search, ".0f"), _spread([r["timings"]["apply_s"] for r in runs], ".0f")])
    setting = first["metrics"]["latency"]["setting"]
    markdown = (
        "## Weight quantization: RTN / GPTQ / AWQ and mixed precision (greedy, AutoMP-RL) (smollm2-135m)\n\n"
        f"Command: `.venv/bin/python benchmarks/quant.py --out DIR --nsamples {args.nsamples} --seeds {args.seeds} "
        f"--episodes {args.episodes}`\n\n"
        "**Read against the model's origin.** The packaged smollm2-135m was distributed as GGUF Q4_1 (asymmetric "
        "4-bit, blocks of 32) and is dequantized on load, so its weights already lie on a 4-bit grid of 32-wide "
        "groups and every 4-bit row is measured against a model that 4-bit quantization has already shaped. "
        "The `RTN W4 g32` row uses Q4_1's block size but is not lossless: our codes follow GPTQ's convention "
        "(the range always includes 0, an integer zero point, fp16 scales) while Q4_1 stores a float minimum "
        "per block, so the two grids differ. Symmetric rows suffer most here (Q4_1's grid is asymmetric); "
        "their scale is absmax / (2^(b-1) - 1) (absmax / 7 at 4 bits), so each group's extreme weight is kept "
        "exactly: GPTQ's and compressed-tensors' absmax / 7.5 leaves it on a ±7.5-step tie, which our float16 "
        "scales broke outwards (RTN W4 g64 sym 74.53 before) and compressed-tensors' float32 arithmetic "
        "mostly inwards (68.87, its peer row below). The "
        "default group is 128 inputs; 576-wide inputs (q/k/v, gate/up) end in a shorter group of 64 "
        "(4 × 128 + 64), 1536-wide ones (down_proj) divide exactly. Weight-only; codes are stored packed (two "
        "4-bit codes a byte, eight 3-bit codes in three bytes) with fp16 scales and uint8 zero points; "
        "embeddings, norms and the tied LM head stay fp32.\n\n"
        f"Protocol: wiki PPL on {args.windows} windows of 512 tokens (dense 44.25 on the same windows); "
        f"calibration {args.nsamples} × 512 wiki windows (GPTQ's Hessians, AWQ's scale search, the statistics), "
        "seed 0. Mixed precision chooses 3/4/8 bits per decoder linear (`4/8`: only 4 or 8) under a "
        "parameter-weighted average-bit budget; `greedy` and the budget projection of `automp-rl` rank linears "
        "by their measured sensitivity (mean KL divergence of the next-token distribution from the dense "
        "model's on 4 × 128 calibration tokens, with only that linear rounded to nearest). automp-rl: REINFORCE, "
        f"{args.episodes} episodes, α 0.7, β 2.0, lr 2e-3, candidates scored on 4 × 128 calibration tokens; the "
        "RL rows are mean ± std over seeds 0..N-1, each a separate run. `stored MiB`: measured bytes of the "
        "quantized linears' stored tensors (codes, scales, zeros); the 16-bit reference is 2 bytes per weight. "
        "`model MiB`: every stored tensor. Decode: "
        f"batch {setting['batch_size']}, prompt {setting['prompt_length']}, {setting['generation_length']} new "
        f"tokens, median of {setting['repeats']}, 2 CPU cores, fp32 compute"
        + (", measured again from the saved models one after another on the idle machine "
           "(`--remeasure-latency`)" if first["metrics"].get("latency_remeasured") else "")
        + "; the packed codes are unpacked and "
        "dequantized per layer on the fly (torch's own int4 CPU kernel, `_weight_int4pack_mm_for_cpu`, was "
        "measured 15× slower than a dense fp32 matmul for one token on this machine, so it is not used). "
        "Search = plan time: the RL search, and the per-linear sensitivity when it was not cached yet (it is "
        "cached per model, calibration tokens and grouping; a run with another seed draws other calibration "
        "windows and computes its own). Quantize = apply time (GPTQ's Hessians and updates, AWQ's scale "
        "search, packing).\n\n"
        + markdown_table(["method", "avg bits", "wiki PPL", "stored MiB", "memory reduction vs 16-bit",
                          "model MiB", "decode tok/s", "search (s)", "quantize (s)"], rows)
    )
    write_section("quant", markdown, {name: [r["metrics"] | {"timings": r["timings"]} for r in runs]
                                      for name, runs in records.items()}, args.remark)
    print(markdown)


if __name__ == "__main__":
    main()
