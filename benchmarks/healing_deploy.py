"""Prune → heal → quantize, deployed (goal 3 of the healing benchmark): the healed models of benchmarks/healing.py
quantized to GGUF and measured in llama.cpp beside llama.cpp's own recipes and our quant-only plan on the dense
model, with the wiki-PPL-against-decode-speed plot.

Every file goes through the deployment benchmark's steps (`deployment.Bench`): an f32 export, llama.cpp's own
quantizer with our calibration profile's importance matrix, and our greedy GGUF-type allocation (the staged
recipe's quantize stage, `compress --structure quant --method gguf`) at the recipe file's tensor bytes. A healed
model is the quantize stage's input as its saved run directory, so the prune and heal stages are not repeated.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional

from deployment import FAST_LEVELS, Bench
from steps import Steps

from layerwise.report.canvas import subplots

DENSE_RECIPES = ("Q8_0", "Q4_K_M", "Q4_0")
BASELINE = "Q4_0"  # llama.cpp's fastest recipe on this model (the deployment table), the speed goal's reference
SPEEDUP_GOAL = 1.2
PPL_GOAL = 1.5


def best_healed(base: str, entries: dict[str, dict]) -> Optional[str]:
    """The finished single-pass healed row of ``base`` with the lowest wiki PPL (None when none has finished)."""
    healed = [(entry["ppl"], name) for name, entry in entries.items()
              if name.startswith(base + "-") and entry["method"] != "unhealed" and entry["stages"] == 1]
    return min(healed)[1] if healed else None


def deploy_rows(args: argparse.Namespace, entries: dict[str, dict], bases: dict[str, str]) -> dict[str, Any]:
    """Measure what is missing (state.json under DIR/deploy keeps finished steps) and return every record, each
    with its plot group; ``bases`` maps a healing base's name to its label."""
    folder = args.out / "deploy"
    folder.mkdir(parents=True, exist_ok=True)
    steps = Steps("healing_deploy", folder, resume=True, carry=False)  # its inputs are DIR's healed runs
    state = steps.state

    def step(key: str, group: str, compute: Callable[[], dict]) -> dict:
        return steps.run(key, lambda: {**compute(), "group": group})

    def bench(model: str, name: str) -> Bench:
        made = Bench(argparse.Namespace(model=model, out=folder / name, windows=args.windows,
                                        nsamples=args.deploy_nsamples, episodes=0))
        made.settings = made.settings.model_copy(update={"kld": False})  # the files are compared in llama.cpp
        made.simulate_rounding = False
        return made

    dense = bench(args.model, "dense")
    (folder / "dense").mkdir(exist_ok=True)
    step("dense f32", "dense f32", lambda: dense.export_and_measure("f32"))
    for recipe in DENSE_RECIPES:
        step(f"dense {recipe} imatrix", "llama.cpp recipe + imatrix (dense)", lambda r=recipe: dense.recipe(r, True))
    for base, label in bases.items():
        source = best_healed(base, entries)
        if source is None:
            continue
        if not (args.out / source / "result.json").is_file():  # a row carried from a lost DIR: no weights here
            print(f"deploy {source}: its healed weights are not in {args.out}; run the row again to deploy it")
            continue
        healed = bench(str(args.out / source), source)
        (folder / source).mkdir(exist_ok=True)
        group = f"{label} → heal → quant"
        step(f"{source} f32", "healed, unquantized (f32)", lambda b=healed: b.export_and_measure("f32"))
        reference = step(f"{source} {BASELINE} imatrix", group, lambda b=healed: b.recipe(BASELINE, True))
        step(f"{source} greedy @ {BASELINE}", group,
             lambda b=healed, r=reference: b.ours("greedy", r, BASELINE, FAST_LEVELS))
    reference = state[f"dense {BASELINE} imatrix"]
    step(f"dense greedy @ {BASELINE}", "ours, quant only (dense)",
         lambda: dense.ours("greedy", reference, BASELINE, FAST_LEVELS))
    for entry in state.values():  # the f32 files are large and only the reference of a quantization
        path = Path(entry.get("path", ""))
        if path.name == "dense-f32.gguf" and path.is_file():
            path.unlink()
    return state


def points(state: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per measured file: label, group, llama.cpp wiki PPL, decode tokens/s and file MiB."""
    found = []
    for key, entry in state.items():
        measured = entry.get("deploy", entry)  # our plans keep the file's measurement under "deploy"
        if measured.get("ppl") is None or not measured.get("latency"):
            continue
        found.append({"key": key, "group": entry["group"], "ppl": measured["ppl"],
                      "decode_tokens_per_s": measured["latency"]["decode_tokens_per_s"],
                      "prefill_ms": measured["latency"]["prefill_ms"], "file_mib": measured["file_bytes"] / 2**20})
    return found


def goal_line(found: list[dict[str, Any]], dense_ppl: Optional[float]) -> str:
    """Goal 3: a prune → heal → quantize file ≥ 1.2× the Q4_0 + imatrix recipe's decode speed at ≤ 1.5× dense PPL."""
    baseline = next((p for p in found if p["key"] == f"dense {BASELINE} imatrix"), None)
    candidates = [p for p in found if p["group"].endswith("→ heal → quant")]
    if baseline is None or not candidates or dense_ppl is None:
        return (f"- prune → heal → quantize decodes ≥ {SPEEDUP_GOAL}× llama.cpp's {BASELINE} + imatrix at wiki PPL "
                f"≤ {PPL_GOAL}× dense: **not measured yet**.")
    ceiling, floor = PPL_GOAL * dense_ppl, SPEEDUP_GOAL * baseline["decode_tokens_per_s"]
    winners = [p for p in candidates if p["ppl"] <= ceiling and p["decode_tokens_per_s"] >= floor]
    best = min(winners or candidates, key=lambda p: (p["ppl"] > ceiling, p["ppl"]))
    speed = best["decode_tokens_per_s"] / baseline["decode_tokens_per_s"]
    return (f"- prune → heal → quantize decodes ≥ {SPEEDUP_GOAL}× llama.cpp's {BASELINE} + imatrix "
            f"({baseline['decode_tokens_per_s']:.1f} tok/s here) at wiki PPL ≤ {PPL_GOAL}× dense (≤ {ceiling:.1f}): "
            f"best file `{best['key']}` decodes {best['decode_tokens_per_s']:.1f} tok/s ({speed:.3f}×) at PPL "
            f"{best['ppl']:.2f}: **{'met' if winners else 'not met'}**.")


def plot(found: list[dict[str, Any]], path: Path) -> Path:
    """Wiki PPL (log scale) against llama.cpp decode tokens/s, one marker per group."""
    figure, axes = subplots(figsize=(7, 4.5))
    for group in dict.fromkeys(p["group"] for p in found):
        chosen = [p for p in found if p["group"] == group]
        axes.scatter([p["decode_tokens_per_s"] for p in chosen], [p["ppl"] for p in chosen], label=group)
        for p in chosen:
            axes.annotate(p["key"].split(" ", 1)[1], (p["decode_tokens_per_s"], p["ppl"]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    axes.set_yscale("log")
    axes.set_xlabel("llama.cpp decode tokens/s (batch 1, 2 threads)")
    axes.set_ylabel("wiki perplexity (llama.cpp, 140 windows)")
    axes.set_title("smollm2-135m: perplexity against decode speed")
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def deploy_markdown(found: list[dict[str, Any]], dense_ppl: Optional[float], figure: Optional[str]) -> str:
    """The deployment part of the healing section: the files' table, goal 3 and the plot's path."""
    from results_table import markdown_table

    if not found:
        return "**Prune → heal → quantize, deployed:** not measured yet.\n"
    table = markdown_table(["file", "group", "MiB", "wiki PPL (llama.cpp)", "decode tok/s", "prefill ms"],
                           [[p["key"], p["group"], f"{p['file_mib']:.1f}", f"{p['ppl']:.2f}",
                             f"{p['decode_tokens_per_s']:.1f}", f"{p['prefill_ms']:.0f}"]
                            for p in sorted(found, key=lambda p: -p["decode_tokens_per_s"])])
    return ("**Prune → heal → quantize, deployed in llama.cpp** (`deploy` steps of the same command): each healed "
            "base's best finished single-pass healing, exported f32 and quantized by llama.cpp's own "
            f"{BASELINE} recipe with our importance matrix and by our greedy GGUF-type allocation over fast-kernel "
            f"types at that file's tensor bytes; beside them llama.cpp's {', '.join(DENSE_RECIPES)} + imatrix "
            "recipes and our greedy plan on the dense model. Perplexity in llama.cpp on the same windows; speed: "
            "prompt 128 + 32 greedy tokens, batch 1, median of 5, 2 threads, measured in this run on this "
            "machine.\n\n" + table + "\n\n" + goal_line(found, dense_ppl) + "\n"
            + (f"\nPlot: [{figure}]({figure}) (wiki PPL against llama.cpp decode tokens/s).\n" if figure else ""))
