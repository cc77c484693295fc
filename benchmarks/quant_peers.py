"""Peer rows for the quantization benchmark: llmcompressor's QuantizationModifier (RTN) and GPTQModifier at
W4A16, symmetric, groups of 64 (its group 128 is rejected: 576 is not a multiple), on the same model,
calibration windows and perplexity protocol as benchmarks/quant.py. Its AWQModifier needs an accelerator
("Cannot access accelerator device") and is not run.

llmcompressor pins transformers 5.15-5.17, so it lives in its own environment: `make bench-peers`
(creates .venv-peers) or `.venv-peers/bin/python benchmarks/quant_peers.py [--windows 30]`.
Writes the `quant_peers` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import calibration_dataset  # noqa: E402
from results_table import HERE, markdown_table, write_section  # noqa: E402

PARTIAL = HERE / "results" / "quant_peers.partial.json"
MODIFIERS = ["QuantizationModifier", "GPTQModifier"]
SCHEME = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="oneshot batch size (windows are equal length)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="only write the table from the partial JSON")
    parser.add_argument("--remark", default="", help="a sentence about this run printed under the table")
    args = parser.parse_args()
    if args.report_only:
        write_results(json.loads(PARTIAL.read_text()), args, seqlen=512)
        return

    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors import safe_open

    import layerwise
    from layerwise.config import LatencySetting
    from layerwise.cost import measure_latency
    from layerwise.data import load_corpus
    from layerwise.evaluate import perplexity

    modifiers = dict(zip(MODIFIERS, [QuantizationModifier, GPTQModifier]))
    state = json.loads(PARTIAL.read_text()) if args.resume and PARTIAL.exists() else {"runs": {}}
    wiki = load_corpus("wiki")
    latency = LatencySetting(repeats=3)

    def save() -> None:
        PARTIAL.parent.mkdir(exist_ok=True)
        PARTIAL.write_text(json.dumps(state, indent=1))

    loaded = layerwise.load(args.model)
    tokens, calibration = calibration_dataset(loaded, args.nsamples)  # the windows our backends calibrate on
    if "dense" not in state:
        state["dense"] = {"wiki": perplexity(loaded.model, loaded.tokenizer, wiki, 512, args.windows).ppl,
                          "decode_tokens_per_s": measure_latency(loaded.model, latency).decode_tokens_per_s}
        save()
    for name, modifier in modifiers.items():
        if name in state["runs"]:
            continue
        loaded = layerwise.load(args.model)
        start = time.perf_counter()
        oneshot(model=loaded.model, dataset=calibration,
                recipe=modifier(config_groups={"group_0": {"targets": ["Linear"], "weights": SCHEME}},
                                ignore=["lm_head"]),
                num_calibration_samples=args.nsamples, max_seq_length=tokens.shape[1], batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        run = {"modifier": name, "seconds": seconds,
               "wiki": perplexity(loaded.model, loaded.tokenizer, wiki, 512, args.windows).ppl,
               "decode_tokens_per_s": measure_latency(loaded.model, latency).decode_tokens_per_s}
        with tempfile.TemporaryDirectory() as directory:  # its packed checkpoint: what it really stores
            loaded.model.save_pretrained(directory, save_compressed=True)
            stored = weights = 0
            for path in Path(directory).glob("*.safetensors"):
                with safe_open(str(path), "pt") as tensors:
                    for key in tensors.keys():
                        if ".layers." in key and "_proj." in key:
                            tensor = tensors.get_tensor(key)
                            stored += tensor.numel() * tensor.element_size()
                            if key.endswith("weight_shape"):
                                weights += int(tensor[0]) * int(tensor[1])
            run.update({"stored_bytes": stored, "weights": weights,
                        "checkpoint_bytes": sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))})
        state["runs"][name] = run
        save()
        print(name, run, flush=True)
    write_results(state, args, tokens.shape[1])


def write_results(state: dict, args: argparse.Namespace, seqlen: int) -> None:
    rows = [["dense (same environment)", f"{state['dense']['wiki']:.2f}", "-", "-", "-",
             f"{state['dense']['decode_tokens_per_s']:.1f}", "-"]]
    for name in MODIFIERS:
        run = state["runs"].get(name)
        if run is None:
            rows.append([f"llmcompressor {name} W4A16 g64", "not run", "", "", "", "", ""])
            continue
        reduction = 1 - run["stored_bytes"] / (2 * run["weights"]) if run["weights"] else float("nan")
        rows.append([f"llmcompressor {name} W4A16 g64", f"{run['wiki']:.2f}", f"{run['stored_bytes'] / 2**20:.2f}",
                     f"{100 * reduction:.1f}%", f"{run['checkpoint_bytes'] / 2**20:.1f}",
                     f"{run['decode_tokens_per_s']:.1f}", f"{run['seconds']:.0f}"])
    markdown = (
        "### Peers: llmcompressor W4A16 (RTN and GPTQ, symmetric, group 64) on the same model, windows and protocol\n\n"
        f"Command: `make bench-peers` (`.venv-peers/bin/python benchmarks/quant_peers.py --windows {args.windows} "
        f"--nsamples {args.nsamples}`), llmcompressor {metadata.version('llmcompressor')}, compressed-tensors "
        f"{metadata.version('compressed-tensors')}, transformers {metadata.version('transformers')}; scheme "
        f"{SCHEME}, `lm_head` ignored (our scope), modifiers otherwise at their defaults; calibration: our "
        f"{args.nsamples} x {seqlen} windows. Compare with our `RTN W4 g64 sym` and `GPTQ W4 g64 sym act-order` "
        "rows above. `stored MiB`: the decoder linears' tensors in its packed (`pack-quantized`) checkpoint; "
        "`checkpoint MiB`: the whole file. Decode tok/s is its in-memory model after oneshot (weights held "
        "dequantized, so it runs at dense speed), median of 3, 2 CPU cores.\n\n"
        + markdown_table(["method", "wiki PPL", "stored MiB", "memory reduction vs 16-bit", "checkpoint MiB",
                          "decode tok/s", "time (s)"], rows)
    )
    write_section("quant_peers", markdown, state, args.remark)
    print(markdown)


if __name__ == "__main__":
    main()
