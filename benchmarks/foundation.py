"""Foundation benchmark: dense perplexity of smollm2-135m and uniform magnitude pruning at 50% / 70%.

Run: `make bench` or `.venv/bin/python benchmarks/foundation.py [--max-windows N]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import markdown_table, write_section  # noqa: E402

import layerwise  # noqa: E402
from layerwise.environment import machine, versions  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/foundation.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-windows", type=int, default=None, help="quick check only; the table uses all windows")
    parser.add_argument("--sparsities", default="0.5,0.7")
    args = parser.parse_args()
    settings = layerwise.RunSettings(max_windows=args.max_windows)
    runs = []
    with tempfile.TemporaryDirectory(prefix="layerwise-bench-") as tmp:
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            start = time.perf_counter()
            record = layerwise.compress(args.model, layerwise.Budget.for_sparsity(sparsity), "magnitude", "uniform",
                                        settings, Path(tmp) / f"magnitude-{sparsity}")
            print(f"magnitude {sparsity}: ppl {record['metrics']['ppl']:.3f} in {time.perf_counter() - start:.1f} s")
            runs.append(record)
    protocol = runs[0]["protocol"]
    dense = runs[0]["metrics"]
    rows = [["dense", "-", f"{dense['dense_ppl']:.3f}", f"{dense['dense']['sparsity']:.2%}",
             f"{dense['dense']['nonzero_parameters']:,}", "-"]]
    for record in runs:
        m = record["metrics"]
        rows.append(["magnitude / uniform", f"{record['budget']['sparsity']:.0%}", f"{m['ppl']:.3f}",
                     f"{m['sparsity']:.2%}", f"{m['nonzero_parameters']:,}", f"{record['timings']['apply_s']:.1f}"])
    env = machine()
    markdown = (
        f"## Foundation: dense and uniform magnitude pruning ({args.model})\n\n"
        f"Command: `{COMMAND}`{' --max-windows ' + str(args.max_windows) if args.max_windows else ''}\n\n"
        f"Protocol: corpus `{protocol['corpus']}` ({protocol['corpus_source']}), split `{protocol['split']}`, "
        f"documents joined with a blank line, tokenized once, {protocol['windows']} non-overlapping windows of "
        f"{protocol['seqlen']} tokens ({protocol['predicted_tokens']:,} predicted tokens), PPL = exp(mean NLL), "
        f"{protocol['dtype']}.\n\n"
        + markdown_table(["model", "sparsity target", "perplexity", "sparsity reached", "non-zero params",
                          "prune time (s)"], rows)
        + f"\nSparsity is over all decoder linears (embeddings and LM head untouched); masked weights are stored "
        f"dense, so weight bytes stay {dense['weight_bytes'] / 2**20:.1f} MiB. The dense model's "
        f"{dense['dense']['sparsity']:.2%} zeros come from its GGUF Q4_1 dequantization. Machine: {env['cpu_count']} CPUs, torch {versions()['torch']}.\n"
    )
    write_section("foundation", markdown, {"runs": runs})
    print(markdown)


if __name__ == "__main__":
    main()
