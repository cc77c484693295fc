"""Calibration cost against a plain forward pass (smollm2-135m, one run, cold caches): the forward over the
calibration tokens, the calibration profile (every decoder linear's input statistics, block by block), and
Wanda and SparseGPT at 50% end to end (plan + apply, profile or Hessians included).

Run: `.venv/bin/python benchmarks/calibration_cost.py --out DIR [--nsamples 128]` alone on the machine; writes the
`calibration_cost` section of benchmarks/RESULTS.md and results/calibration_cost.json. Caches go to DIR, so every
step starts cold.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--remark", default="")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["LAYERWISE_CACHE"] = str(args.out / "cache")  # before layerwise reads it: every step runs cold

    import torch
    from results_table import markdown_table, write_section

    import layerwise
    from layerwise.calibration import CalibrationSource
    from layerwise.calibration.profile import compute_profile
    from layerwise.pipeline import compress

    loaded = layerwise.load(args.model)
    settings = layerwise.RunSettings(nsamples=args.nsamples, max_windows=1, latency=None)
    tokens = CalibrationSource(loaded, settings).tokens()
    batch = settings.calib_batch_size

    def forward() -> None:
        with torch.no_grad():
            for ids in tokens.split(batch):
                loaded.model(input_ids=ids, use_cache=False)

    def seconds(step) -> float:
        started = time.perf_counter()
        step()
        return time.perf_counter() - started

    forward()  # warm-up
    timings = {"forward": seconds(forward),
               "profile": seconds(lambda: compute_profile(loaded.model, tokens, batch))}
    for method in ("wanda", "sparsegpt"):
        record = compress(args.model, layerwise.Budget(sparsity=0.5), method=method, settings=settings,
                          out=args.out / method, overwrite=True)
        timings[method] = record["timings"]["plan_s"] + record["timings"]["apply_s"]
    forward_s = timings["forward"]
    goals = {"profile": 1.1, "sparsegpt": 2.0}
    rows = [[name, f"{value:.1f}", f"{value / forward_s:.2f}×",
             (f"≤ {goals[name]}×: {'met' if value / forward_s <= goals[name] else 'not met'}" if name in goals else "-")]
            for name, value in timings.items()]
    markdown = (
        "## Calibration cost against a plain forward pass (smollm2-135m)\n\n"
        f"Command: `.venv/bin/python benchmarks/calibration_cost.py --out DIR --nsamples {args.nsamples}`\n\n"
        f"{args.nsamples} calibration windows of 512 tokens, batches of {batch}, fp32, 2 CPU cores, cold caches "
        "(DIR holds them). `forward`: the whole model over those tokens (embedding, every block, the LM head's "
        "logits), after one warm-up. `profile`: every decoder linear's input statistics (feature norms for "
        "Wanda/OWL, moments for the quantization state), block by block; the statistics of linears fed one "
        "tensor (q/k/v, gate/up) are computed once, with one elementwise pass (the squares) and reductions or "
        "dot products for the rest. `wanda`, `sparsegpt`: 50% unstructured end to end (plan + apply), both "
        "sequential (each block calibrated on the pruned blocks' outputs); their statistics pass over a block "
        "stops at the input of its last target linear (down_proj), whose product nothing needs.\n\n"
        + markdown_table(["step", "seconds", "vs forward", "goal"], rows) + "\n\n"
        "Why SparseGPT stays above 2×: sequential SparseGPT (as its reference code) runs every block twice, once "
        "to collect the Hessians of its linears' inputs and once, pruned, to feed the next block, and forms the "
        "Gram products XᵀX. Counted in multiply-adds per token on smollm2-135m: a block's linears are 3.5 M "
        "(down_proj 0.9 M) and the LM head 28.3 M, so the plain forward is about 135 M; SparseGPT spends 30 × 2.7 M "
        "on the statistics passes, 29 × 3.5 M on the pruned passes and 30 × (3 × 576² + 1536²) ≈ 100 M on the Gram "
        "products (of q/k/v's, o_proj's, gate/up's and down_proj's inputs, one per shared input), about 283 M: "
        "2.1× before the OBS updates and attention. Computing only the upper half of each Gram product in blocks "
        "was measured no faster here (smaller products run less efficiently). Below 2× needs another algorithm "
        "(every Hessian from the dense model in one pass, non-sequential), "
        "not a faster implementation of this one.\n"
    )
    write_section("calibration_cost", markdown, timings, args.remark)
    print(markdown)


if __name__ == "__main__":
    main()
