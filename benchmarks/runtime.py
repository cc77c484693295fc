"""Runtime-adaptive pruning benchmark: train the Double DQN controller on smollm2-135m under the tool's own
machine loads, then serve disjoint test prompts with it and with every fixed profile under each load.

Run: `.venv/bin/python benchmarks/runtime.py --out DIR [--episodes 50 --train-samples 200 --test-samples 10]
[--resume [--retest]]` on an otherwise idle machine (speeds are measured; the loads are the tool's own). It calls the real
CLI (`layerwise runtime train`, then `layerwise runtime test`) and writes the `runtime` section of
benchmarks/RESULTS.md and results/runtime.json from DIR/test.json and the checkpoint's training records.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import markdown_table, write_section  # noqa: E402


def cli(*args: str) -> None:
    """Run the installed ``layerwise`` command of this interpreter's environment."""
    command = [str(Path(sys.executable).parent / "layerwise"), *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--steps-per-episode", type=int, default=10)
    parser.add_argument("--exploration-steps", type=int, default=400)
    parser.add_argument("--train-samples", type=int, default=200)
    parser.add_argument("--test-samples", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--load-profile", default="idle,cpu,memory,mixed")
    parser.add_argument("--resume", action="store_true", help="continue training; skip a finished test")
    parser.add_argument("--retest", action="store_true", help="run the test again even when DIR/test.json exists")
    parser.add_argument("--remark", default="")
    args = parser.parse_args()

    checkpoint = args.out / "ckpt.pt"
    common = ["--model", args.model, "--checkpoint", str(checkpoint), "--max-new-tokens", str(args.max_new_tokens),
              "--train-samples", str(args.train_samples), "--load-profile", args.load_profile]
    cli("runtime", "train", *common, "--episodes", str(args.episodes), "--steps-per-episode",
        str(args.steps_per_episode), "--exploration-steps", str(args.exploration_steps),
        *(["--resume"] if args.resume else []))
    if args.retest or not (args.resume and (args.out / "test.json").is_file()):
        cli("runtime", "test", *common, "--ppl-samples", str(args.test_samples), "--out", str(args.out))
    write_results(args)


def verdict(gap: float, se: float) -> str:
    """How a paired difference reads against two standard errors."""
    if gap > 2 * se:
        return "the controller is better"
    if gap < -2 * se:
        return "the controller is worse"
    return "within two standard errors, no demonstrated difference"


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def write_results(args: argparse.Namespace) -> None:
    import json

    import torch

    from layerwise.runtime.session import summarize

    tests = json.loads((args.out / "test.json").read_text())
    extra = torch.load(args.out / "ckpt.pt", weights_only=False)["extra"]
    training = extra["records"]
    groups = {(row["condition"], row["policy"]): row for row in summarize(tests)}
    conditions = list(dict.fromkeys(c for c, _ in groups))
    policies = list(dict.fromkeys(p for _, p in groups))

    def cell(condition: str | None, policy: str, key: str) -> float:
        """Mean of ``key`` under one load, or over all loads (each load serves the same prompts)."""
        if condition is None:
            return mean([groups[(c, policy)][key] for c in conditions])
        return groups[(condition, policy)][key]

    def mix(condition: str) -> str:
        chosen = groups[(condition, "controller")]["profiles"]
        return ", ".join(f"{p} ×{n}" for p, n in sorted(chosen.items(), key=lambda kv: -kv[1]))

    overall = {p: cell(None, p, "reward") for p in policies}
    ranked = sorted(policies, key=lambda p: -overall[p])
    rows = [[p.removeprefix("fixed:"), *(f"{cell(c, p, 'tokens_per_s'):.1f} / {cell(c, p, 'ppl'):.2f} / "
                                         f"{cell(c, p, 'reward'):.2f}" for c in conditions), f"{overall[p]:.3f}"]
            for p in ranked]
    table = markdown_table(["policy", *(f"{c}: tok/s / PPL / reward" for c in conditions), "mean reward"], rows)

    best_fixed = max((p for p in policies if p != "controller"), key=overall.get)
    beats = overall["controller"] > overall[best_fixed]
    # paired by request: every test prompt was served by every policy back to back under the same load
    ours = [r["reward"] for r in tests if r["policy"] == "controller"]
    theirs = [r["reward"] for r in tests if r["policy"] == best_fixed]
    gaps = [a - b for a, b in zip(ours, theirs)]
    gap = mean(gaps)
    gap_se = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
    best_by_condition = {c: max((p for p in policies if p != "controller"), key=lambda p: cell(c, p, "reward"))
                         for c in conditions}
    mixes = {c: mix(c) for c in conditions}
    loaded = [c for c in conditions if c != "idle"]
    differs = [c for c in loaded if mixes[c] != mixes.get("idle")]
    switch = {p.removeprefix("fixed:"): cell(None, p, "switch_ms") for p in policies if p.startswith("fixed:")}
    controller_decide = cell(None, "controller", "decide_ms")
    overhead = 100 * mean([r["decide_ms"] / r["decode_ms"] for r in tests if r["policy"] == "controller"])
    episodes = sorted({r["episode"] for r in training})
    first, last = episodes[:10], episodes[-10:]
    early = mean([r["reward"] for r in training if r["episode"] in first])
    late = mean([r["reward"] for r in training if r["episode"] in last])
    switch_rows = [[name, f"{ms:.2f}"] for name, ms in switch.items()]

    markdown = f"""## Runtime-adaptive pruning (Double DQN controller, {args.model})

Command: `.venv/bin/python benchmarks/runtime.py --out DIR --episodes {args.episodes} --exploration-steps {args.exploration_steps} --train-samples {args.train_samples} --test-samples {args.test_samples} --max-new-tokens {args.max_new_tokens}` (runs `layerwise runtime train`, then `layerwise runtime test`). Reward: the seed's `0.6·tokens/s − 0.4·PPL/10`; tokens/s of the whole request (prefill + {args.max_new_tokens} decoded tokens, batch 1, 2 CPU cores, fp32), PPL of the dense model's greedy continuation under the served profile (teacher-forced). Loads are the tool's own: `cpu` = 2 spinning workers at 90% duty, `memory` = a 4 GiB ballast, `mixed` = 1 worker at 70% + 30% ballast. Training: {len(training)} requests over {len(episodes)} episodes ({args.steps_per_episode} a episode, one load each, cycled), {args.train_samples} training prompts; ε 1 → 0.05 over {args.exploration_steps} requests. Test: {args.test_samples} disjoint prompts (questions of ARC-e/c, BoolQ, CSQA, SIQA, SciQ, NQ-open and wiki passages), each served by every policy under every load. Profiles are sliced views of the dense weights (act importance, 32 calibration windows).

{table}

- Controller mean reward {overall['controller']:.3f} vs the best fixed profile ({best_fixed.removeprefix('fixed:')}) {overall[best_fixed]:.3f}: {'beats every fixed profile' if beats else 'does NOT beat every fixed profile'}.
- Paired over the {len(gaps)} test requests (same prompt, same load, back to back), controller − {best_fixed.removeprefix('fixed:')}: {gap:+.3f} ± {gap_se:.3f} (standard error): {verdict(gap, gap_se)}.
- Best fixed profile per load: {'; '.join(f"{c}: {best_by_condition[c].removeprefix('fixed:')} {cell(c, best_by_condition[c], 'reward'):.2f} (controller {cell(c, 'controller', 'reward'):.2f})" for c in conditions)}.
- Controller's choices by load: {'; '.join(f'{c}: {mixes[c]}' for c in conditions)}. They {'differ between idle and ' + ', '.join(differs) if differs else 'do NOT differ between idle and the loaded conditions'}.
- Controller overhead: {controller_decide:.2f} ms a request (telemetry + prompt features + Q-network), {overhead:.2f}% of the request's decode time.
- Training reward, mean of the first 10 episodes → last 10: {early:.2f} → {late:.2f}.

Switching cost (activate the profile + restore the dense model, mean over the test requests, ms):

{markdown_table(['profile', 'switch (ms)'], switch_rows)}
"""
    summary = {"overall_reward": overall, "best_fixed": best_fixed, "controller_beats_every_fixed": beats,
               "paired_gap": gap, "paired_gap_se": gap_se, "best_fixed_by_condition": best_by_condition,
               "controller_mix": mixes, "switch_ms": switch, "controller_decide_ms": controller_decide,
               "controller_overhead_percent": overhead, "training_reward_first_last": [early, late],
               "settings": {k: str(v) for k, v in vars(args).items()}, "test_records": tests}
    write_section("runtime", markdown, summary, args.remark)
    print(markdown)


if __name__ == "__main__":
    main()
