"""Unstructured sparsity benchmark (AlphaPruning issue): methods x allocators x sparsities on smollm2-135m.

Run: `.venv/bin/python benchmarks/unstructured.py [--windows 30] [--resume]`. Uses a fresh cache
directory, so calibration, profile and spectra are measured cold. Writes the `unstructured` section of
benchmarks/RESULTS.md and benchmarks/results/unstructured.json (after every run, so it can resume).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import HERE, markdown_table, write_section  # noqa: E402

# wanda (sequential, the default) and wanda-one-pass (every norm from one profile of the dense model, as
# this grid computed "wanda" before sequential became the default); wanda-one-pass first: its first run
# measures the cold profile
METHODS = ["wanda-one-pass", "wanda", "magnitude", "sparsegpt"]
ALLOCATORS = ["uniform", "owl", "alpha"]
SPARSITIES = [0.5, 0.6, 0.7]
PARTIAL = HERE / "results" / "unstructured.partial.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=30, help="evaluation windows of 512 tokens per corpus")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--resume", action="store_true", help="keep finished runs from the partial JSON")
    parser.add_argument("--report-only", action="store_true", help="only write the table from the partial JSON")
    parser.add_argument("--from-runs", type=Path, default=None,
                        help="take the compressed models of the matching keys from this headline.py --out directory "
                             "(the same compress command at 128 windows) and only evaluate them here")
    parser.add_argument("--only", default="*", help="run only the keys method/allocator/sparsity matching this glob")
    parser.add_argument("--remark", default="", help="a sentence about this run printed under the table")
    args = parser.parse_args()
    if args.report_only:
        write_results(json.loads(PARTIAL.read_text()), args)
        return
    os.environ["LAYERWISE_CACHE"] = tempfile.mkdtemp(prefix="layerwise-bench-cache-")

    import torch

    import layerwise
    from layerwise.calibration import CalibrationSource
    from layerwise.data import load_corpus
    from layerwise.evaluate import perplexity

    state = json.loads(PARTIAL.read_text()) if args.resume and PARTIAL.exists() else {"runs": {}}
    settings = layerwise.RunSettings(nsamples=args.nsamples, max_windows=args.windows)
    wiki, ptb = load_corpus("wiki"), load_corpus("ptb")

    def ppl(loaded, corpus) -> float:
        result = perplexity(loaded.model, loaded.tokenizer, corpus, 512, args.windows)
        state.setdefault("protocol", {})[corpus.name] = result.protocol.model_dump()
        return result.ppl

    def save() -> None:
        PARTIAL.parent.mkdir(exist_ok=True)
        PARTIAL.write_text(json.dumps(state, indent=1))

    if "dense" not in state:
        loaded = layerwise.load(args.model)
        tokens = CalibrationSource(loaded, settings).tokens()
        start = time.perf_counter()
        with torch.no_grad():
            for batch in tokens.split(settings.calib_batch_size):
                loaded.model(input_ids=batch, use_cache=False)
        forward_s = time.perf_counter() - start
        state["dense"] = {"wiki": ppl(loaded, wiki), "ptb": ppl(loaded, ptb), "forward_s": forward_s}
        save()
        print(f"dense: {state['dense']}")

    for sparsity in SPARSITIES:
        for method in METHODS:
            for allocator in ALLOCATORS:
                key = f"{method}/{allocator}/{sparsity}"
                if key in state["runs"] or not fnmatch.fnmatch(key, args.only):
                    continue
                if args.from_runs is not None:
                    from headline import run_dir_name

                    options = f"--method {method} --allocator {allocator} --sparsity {sparsity:g} --nsamples {args.nsamples}"
                    saved = layerwise.load(str(args.from_runs / run_dir_name(options)))
                    state["runs"][key] = {"method": method, "allocator": allocator, "sparsity": sparsity,
                                          "wiki": ppl(saved, wiki), "ptb": ppl(saved, ptb), "from_run": options}
                    save()
                    print(f"{key}: wiki {state['runs'][key]['wiki']:.2f} (saved run)")
                    continue
                loaded = layerwise.load(args.model)
                source = CalibrationSource(loaded, settings)
                start = time.perf_counter()
                plan = layerwise.plan(loaded, layerwise.Budget(sparsity=sparsity), method, allocator,
                                      calibration=source)
                plan_s = time.perf_counter() - start
                layerwise.apply(loaded.model, plan, source)
                total_s = time.perf_counter() - start
                run = {"method": method, "allocator": allocator, "sparsity": sparsity, "wiki": ppl(loaded, wiki),
                       "plan_s": plan_s, "compress_s": total_s, "profile_s": source.profile_seconds,
                       "profile_cached": source.profile_from_cache,
                       "spectra_cached": plan.details.get("metric_from_cache"),
                       "block_sparsity": plan.details.get("block_sparsity")}
                if sparsity == 0.7:
                    run["ptb"] = ppl(loaded, ptb)
                state["runs"][key] = run
                save()
                print(f"{key}: wiki {run['wiki']:.2f} in {total_s:.1f} s")
    write_results(state, args)


def write_results(state: dict, args: argparse.Namespace) -> None:
    dense, runs = state["dense"], state["runs"]
    dense.pop("protocol", None)  # an early version stored a 1-window probe's protocol here
    rows = [["dense", "-", "-", f"{dense['wiki']:.2f}", f"{dense['ptb']:.2f}", "-"]]
    for sparsity in SPARSITIES:
        for method in METHODS:
            for allocator in ALLOCATORS:
                run = runs.get(f"{method}/{allocator}/{sparsity}")
                if run is None:
                    rows.append([method, allocator, f"{sparsity:.0%}", "not run", "", ""])
                    continue
                rows.append([method, allocator, f"{sparsity:.0%}", f"{run['wiki']:.2f}",
                             f"{run['ptb']:.2f}" if "ptb" in run else "",
                             f"{run['compress_s']:.1f}" if "compress_s" in run else "see headline"])
    ref = dense["forward_s"]
    wanda_cold = runs["wanda-one-pass/uniform/0.5"]
    alpha_cold = runs["wanda-one-pass/alpha/0.5"]
    sgpt = runs["sparsegpt/uniform/0.5"]
    speed = [
        ["dense forward over the calibration windows (reference)", f"{ref:.1f}", "1.00", ""],
        ["wanda-one-pass 50%, end to end (profile cold + plan + apply)", f"{wanda_cold['compress_s']:.1f}",
         f"{wanda_cold['compress_s'] / ref:.2f}", "<= 1.5"],
        ["sparsegpt 50% (sequential calibration + OBS updates)", f"{sgpt['compress_s']:.1f}",
         f"{sgpt['compress_s'] / ref:.2f}", "<= 4"],
        ["alpha spectra of 210 matrices (cold)", f"{alpha_cold['plan_s']:.1f}", f"{alpha_cold['plan_s'] / ref:.2f}",
         "<= 0.5"],
    ]
    # Runs started before the protocol was recorded per corpus: 30 of the split's 140 windows, as run.
    protocol = state.setdefault("protocol", {}).setdefault(
        "wiki", {"windows": args.windows, "seqlen": 512, "predicted_tokens": args.windows * 511})
    markdown = (
        f"## Unstructured sparsity: magnitude / Wanda / SparseGPT x uniform / OWL / AlphaPruning ({args.model})\n\n"
        f"Command: `.venv/bin/python benchmarks/unstructured.py --windows {args.windows} --nsamples {args.nsamples}`\n\n"
        f"Perplexity on the first {protocol['windows']} windows of {protocol['seqlen']} tokens "
        f"({protocol['predicted_tokens']:,} predicted tokens) of each evaluation split (wiki: the 10 evaluation "
        "articles; ptb: treebank test), the same windows for every row; calibration: "
        f"{args.nsamples} x 512-token windows of the wiki calibration split, seed 0. OWL: M=5, lambda=0.08; "
        "alpha: alpha_peak, epsilon=0.2. `wanda` is sequential, as Wanda's own code (and OWL's and "
        "AlphaPruning's copies) prunes: block by block, each block's norms taken on the outputs of the blocks "
        "already pruned before it; `wanda-one-pass` takes every norm from one profile of the dense model (what "
        "this grid called wanda before sequential became the default). Time = plan + apply, profile included "
        "when computed (cold cache).\n\n"
        + markdown_table(["method", "allocator", "sparsity", "wiki PPL", "ptb PPL", "time (s)"], rows)
        + "\nSpeed, as ratios to one dense forward pass over the same calibration tokens (2 CPU cores, fp32):\n\n"
        + markdown_table(["step", "seconds", "ratio", "target"], speed)
    )
    reused = sorted(k for k, r in runs.items() if "from_run" in r)
    if reused:
        markdown += ("\nRows with time 'see headline' (" + ", ".join(reused) + ") are the models "
                     "`benchmarks/headline.py` compressed with the same command and calibration (its time column "
                     "has their compress time), evaluated here on the quick grid's windows "
                     "(`--from-runs DIR --only PATTERN`).\n")
    markdown += "\n" + findings(runs)
    write_section("unstructured", markdown, state, args.remark)
    print(markdown)


def findings(runs: dict) -> str:
    """The published orderings this benchmark checks, stated from the numbers above."""

    def wiki(key: str) -> float | None:
        return runs[key]["wiki"] if key in runs else None

    def verdict(better: str, worse: str) -> str:
        a, b = wiki(better), wiki(worse)
        if a is None or b is None:
            return f"- `{better}` vs `{worse}`: not run.\n"
        holds = "holds" if a < b else "does not hold"
        return f"- `{better}` ({a:.2f}) below `{worse}` ({b:.2f}): {holds}.\n"

    lines = "Published orderings at 70% (wiki PPL, lower is better):\n\n"
    for wanda in ("wanda", "wanda-one-pass"):
        lines += verdict(f"{wanda}/alpha/0.7", f"{wanda}/uniform/0.7")
        lines += verdict(f"{wanda}/owl/0.7", f"{wanda}/uniform/0.7")
        lines += verdict("sparsegpt/uniform/0.7", f"{wanda}/uniform/0.7")
    for allocator in ("owl", "alpha"):
        blocks = next((runs[k]["block_sparsity"] for k in (f"wanda/{allocator}/0.7", f"wanda-one-pass/{allocator}/0.7")
                       if runs.get(k, {}).get("block_sparsity")), None)
        if blocks:
            values = [blocks[k] for k in sorted(blocks, key=int)]
            third = len(values) // 3
            lines += (f"- {allocator} at 70% gives the first {third} blocks {sum(values[:third]) / third:.1%} "
                      f"sparsity on average and the last {third} {sum(values[-third:]) / third:.1%}.\n")
    return lines


if __name__ == "__main__":
    main()
