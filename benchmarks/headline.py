"""Headline rows on the full evaluation protocol: every method x allocator at 70% sparsity, every width
allocator at ratio 0.3, every depth method at 1.4x, every uniform 4-bit quantization row, each scored on all 140
wiki evaluation windows of 512 tokens (the split the foundation and the demo report).

Run: `.venv/bin/python benchmarks/headline.py --out DIR [--only unstructured,width] [--resume]`. Each row is
one `layerwise compress` command, stated in the table, run as a user would run it (latency not measured:
this table is about quality; the per-structure sections measure speed). Writes the `headline` section of
benchmarks/RESULTS.md and results/headline.json after every row, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import HERE, markdown_table, read_results, write_section  # noqa: E402

STATE = HERE / "results" / "headline.json"
UNSTRUCTURED = [f"--method {m} --allocator {a} --sparsity 0.7 --nsamples 128"
                for m in ("magnitude", "wanda", "sparsegpt") for a in ("uniform", "owl", "alpha")]
WIDTH = [f"--structure width --allocator {a} --pruning-ratio 0.3 --nsamples 32"
         for a in ("uniform", "adapt", "rl", "rl-refine")]
DEPTH = [f"--structure depth --allocator {a} --target-speedup 1.4 --nsamples 8 --calib-seqlen 256"
         for a in ("sprint", "sleb", "shortgpt", "drop-last")]
QUANT = [f"--structure quant --nsamples 32 {options}" for options in (
    "--method rtn --bits 4",
    "--method rtn --bits 4 --symmetric",
    "--method rtn --bits 4 --symmetric --group-size 64",
    "--method rtn --bits 4 --group-size 32",
    "--method gptq --bits 4 --no-act-order",
    "--method gptq --bits 4",
    "--method gptq --bits 4 --symmetric --group-size 64",
    "--method rtn --bits 4 --awq",
)]
SECTIONS = {"unstructured": UNSTRUCTURED, "width": WIDTH, "depth": DEPTH, "quant": QUANT}


def run_dir_name(options: str) -> str:
    """The directory (under --out) that the row with these compress options is saved in."""
    return options.replace("--", "").replace(" ", "_").replace(",", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory for the saved runs")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--resume", action="store_true", help="keep rows already in results/headline.json")
    parser.add_argument("--match", default="*", help="run only rows whose options match one of these '|'-separated "
                                                      "globs, in the order of the globs")
    parser.add_argument("--remark", default="")
    args = parser.parse_args()
    state = read_results("headline") if args.resume and STATE.exists() else {"rows": {}}
    layerwise = Path(sys.executable).parent / "layerwise"
    wanted = [options for section in args.only.split(",") for options in SECTIONS[section]]
    ordered = [o for pattern in args.match.split("|") for o in wanted if fnmatch.fnmatch(o, pattern)]
    for options in dict.fromkeys(ordered):
        section = next(name for name, rows in SECTIONS.items() if options in rows)
        if options in state["rows"]:
            continue
        run_dir = args.out / run_dir_name(options)
        command = f"layerwise compress --model {args.model} {options} --no-latency --out {run_dir} --overwrite"
        start = time.perf_counter()
        subprocess.run([str(layerwise), *shlex.split(command)[1:]], check=True)
        record = json.loads((run_dir / "result.json").read_text())
        state["rows"][options] = {"section": section, "wall_s": time.perf_counter() - start,
                                  "ppl": record["metrics"]["ppl"], "dense_ppl": record["metrics"]["dense_ppl"],
                                  "protocol": record["protocol"]}
        STATE.parent.mkdir(exist_ok=True)
        STATE.write_text(json.dumps(state, indent=1))
        print(f"{options}: wiki {record['metrics']['ppl']:.2f}", flush=True)
    write_results(state, args)


def write_results(state: dict, args: argparse.Namespace) -> None:
    rows = state["rows"]
    dense = {round(r["dense_ppl"], 3) for r in rows.values()}
    table = [["dense", "-", "-", f"{min(dense):.2f}", "-"]]
    for section, commands in SECTIONS.items():
        for options in commands:
            run = rows.get(options)
            table.append([section, f"`{options}`", str(run["protocol"]["windows"]) if run else "not run",
                          f"{run['ppl']:.2f}" if run else "", f"{run['wall_s']:.0f}" if run else ""])
    markdown = (
        f"## Headline rows on the full protocol (all 140 wiki windows) ({args.model})\n\n"
        f"Command: `.venv/bin/python benchmarks/headline.py --out DIR`\n\n"
        "Every row is the command `layerwise compress --model smollm2-135m OPTIONS --no-latency` with the options "
        "shown, scored on every window of the wiki evaluation split (140 windows of 512 tokens, "
        f"{140 * 511:,} predicted tokens; the windows column is what each run recorded). The "
        "per-structure sections below score the same methods on the first 30 windows (a quick grid, dense "
        "44.25) and also measure speed; this table is the one to quote. Calibration: wiki calibration split, "
        "seed 0, the sample counts shown. Time = the whole command (load, "
        "plan, apply, evaluate, save) with the caches of earlier rows warm.\n\n"
        + markdown_table(["structure", "options", "windows", "wiki PPL", "time (s)"], table)
    )
    markdown += "\n" + orderings(rows)
    write_section("headline", markdown, state, args.remark)
    print(markdown)


def _unstructured(method: str, allocator: str) -> str:
    return f"--method {method} --allocator {allocator} --sparsity 0.7 --nsamples 128"


ORDERINGS = [  # (better, worse, what the published work says), exact row options
    (_unstructured("wanda", "owl"), _unstructured("wanda", "uniform"), "OWL below uniform, Wanda (OWL paper)"),
    (_unstructured("wanda", "alpha"), _unstructured("wanda", "uniform"), "alpha below uniform, Wanda (AlphaPruning)"),
    (_unstructured("sparsegpt", "uniform"), _unstructured("wanda", "uniform"), "SparseGPT below Wanda"),
    (_unstructured("sparsegpt", "owl"), _unstructured("sparsegpt", "uniform"), "OWL below uniform, SparseGPT"),
    (_unstructured("sparsegpt", "alpha"), _unstructured("sparsegpt", "uniform"), "alpha below uniform, SparseGPT"),
    (WIDTH[2], WIDTH[0], "RL-Allocator below uniform width"),
    (WIDTH[3], WIDTH[1], "RL-Refine below its adapt start"),
    (DEPTH[0], DEPTH[1], "SPRINT below SLEB at the same speedup"),
    (QUANT[5], QUANT[0], "GPTQ act-order below RTN"),
    (QUANT[7], QUANT[0], "AWQ below RTN"),
]


def orderings(rows: dict) -> str:
    """The published orderings among the headline rows, as measured here."""
    lines = ["Published orderings on the full protocol (lower wiki PPL is better):", ""]
    for better, worse, claim in ORDERINGS:
        if better not in rows or worse not in rows:
            lines.append(f"- {claim}: not run.")
            continue
        a, b = rows[better]["ppl"], rows[worse]["ppl"]
        lines.append(f"- {claim}: {a:.2f} vs {b:.2f}, ratio {a / b:.3f}: {'holds' if a < b else 'does not hold'}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
