"""Peer rows for the unstructured benchmark: llmcompressor's SparseGPT and Wanda modifiers on the same
model, calibration windows and perplexity protocol as benchmarks/unstructured.py.

llmcompressor pins transformers 5.15-5.17, so it lives in its own environment: `make bench-peers`
(creates .venv-peers) or `.venv-peers/bin/python benchmarks/unstructured_peers.py [--windows 30]`.
Writes the `unstructured_peers` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import calibration_dataset  # noqa: E402
from results_table import HERE, markdown_table, write_section  # noqa: E402

PARTIAL = HERE / "results" / "unstructured_peers.partial.json"
MODIFIERS = ["SparseGPTModifier", "WandaPruningModifier"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--sparsities", default="0.7")
    parser.add_argument("--batch-size", type=int, default=8, help="oneshot batch size (windows are equal length)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="only write the table from the partial JSON")
    parser.add_argument("--remark", default="", help="a sentence about this run printed under the table")
    args = parser.parse_args()
    if args.report_only:
        write_results(json.loads(PARTIAL.read_text()), args, seqlen=512)
        return

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    import layerwise
    from layerwise.data import load_corpus
    from layerwise.evaluate import perplexity

    modifiers = dict(zip(MODIFIERS, [SparseGPTModifier, WandaPruningModifier]))
    state = json.loads(PARTIAL.read_text()) if args.resume and PARTIAL.exists() else {"runs": {}}
    wiki, ptb = load_corpus("wiki"), load_corpus("ptb")

    def save() -> None:
        PARTIAL.parent.mkdir(exist_ok=True)
        PARTIAL.write_text(json.dumps(state, indent=1))

    def ppl(loaded, corpus) -> float:
        return perplexity(loaded.model, loaded.tokenizer, corpus, 512, args.windows).ppl

    loaded = layerwise.load(args.model)
    tokens, calibration = calibration_dataset(loaded, args.nsamples)  # the windows our backends calibrate on
    if "dense" not in state:
        state["dense"] = {"wiki": ppl(loaded, wiki), "ptb": ppl(loaded, ptb)}
        save()
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        for name, modifier in modifiers.items():
            key = f"{name}/{sparsity}"
            if key in state["runs"]:
                continue
            loaded = layerwise.load(args.model)
            start = time.perf_counter()
            oneshot(model=loaded.model, dataset=calibration,
                    recipe=modifier(sparsity=sparsity, mask_structure="0:0", ignore=["lm_head"]),
                    num_calibration_samples=args.nsamples, max_seq_length=tokens.shape[1], batch_size=args.batch_size)
            seconds = time.perf_counter() - start
            size = layerwise.cost.measure_size(loaded.model)
            state["runs"][key] = {"modifier": name, "sparsity": sparsity, "seconds": seconds,
                                  "reached": size.sparsity, "wiki": ppl(loaded, wiki), "ptb": ppl(loaded, ptb)}
            save()
            print(key, state["runs"][key])
    write_results(state, args, tokens.shape[1])


def write_results(state: dict, args: argparse.Namespace, seqlen: int) -> None:
    rows = [["dense (same environment)", "-", "-", f"{state['dense']['wiki']:.2f}", f"{state['dense']['ptb']:.2f}", "-"]]
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        for name in MODIFIERS:
            run = state["runs"].get(f"{name}/{sparsity}")
            if run is None:
                rows.append([f"llmcompressor {name}", f"{sparsity:.0%}", "not run", "", "", ""])
                continue
            rows.append([f"llmcompressor {name}", f"{sparsity:.0%}", f"{run['reached']:.2%}",
                         f"{run['wiki']:.2f}", f"{run['ptb']:.2f}", f"{run['seconds']:.0f}"])
    markdown = (
        "### Peers: llmcompressor's pruning modifiers on the same model, windows and protocol\n\n"
        f"Command: `make bench-peers` (`.venv-peers/bin/python benchmarks/unstructured_peers.py --windows "
        f"{args.windows} --nsamples {args.nsamples} --sparsities {args.sparsities}`), llmcompressor "
        f"{metadata.version('llmcompressor')}, transformers {metadata.version('transformers')}; modifiers at their "
        "defaults (uniform sparsity, dampening 0.01, block 128), `lm_head` ignored so the scope equals ours; "
        f"calibration: our {args.nsamples} x {seqlen} windows, oneshot batch size {args.batch_size}.\n\n"
        + markdown_table(["method", "sparsity", "reached", "wiki PPL", "ptb PPL", "time (s)"], rows)
    )
    write_section("unstructured_peers", markdown, state, args.remark)
    print(markdown)


if __name__ == "__main__":
    main()
