"""Runtime-adaptive pruning benchmark: on smollm2-135m, under the tool's own machine loads, with a latency
objective drawn per request (``--reward slo``, the default) or the seed's linear reward (``--reward linear``).

1. ``layerwise runtime oracle``: before training, every fixed profile under every load: which is best where;
2. ``layerwise runtime train``: the Double DQN controller (the first discount of ``--gammas``, seed 0), then
   ``layerwise runtime retrain`` on its logged transitions for every other (discount, seed);
3. ``layerwise runtime test``: disjoint test prompts, each served by every learned controller, the no-learning
   rule and every fixed profile back to back under each load, with the same objective (paired);
4. a loopback load test of ``layerwise serve`` (OpenAI ``/v1/completions``, concurrency 4, 200 requests, bounded
   time), a quarter of the requests under each load, with the online controller.

Run: `.venv/bin/python benchmarks/runtime.py --out DIR [--resume]` on an otherwise idle machine (about 2 hours) (speeds are measured; the
loads are the tool's own). Writes the `runtime` section of benchmarks/RESULTS.md and results/runtime.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
    parser.add_argument("--reward", default="slo", choices=["slo", "linear"])
    parser.add_argument("--slo-ms", default="0.7x:3x", help="objectives in ms, or factors of each request's idle "
                        "dense latency (0.7x:3x): factors bind alike on a faster or a slower machine")
    parser.add_argument("--slo-penalty", type=float, default=8.0)
    parser.add_argument("--profiles", default="ffn_neurons@0.25,ffn_neurons@0.5,ffn_neurons@0.7,"
                                              "transformer_layers@0.3,transformer_layers@0.45")
    parser.add_argument("--load-profile", default="idle,spin1,spin2,memory")
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--steps-per-episode", type=int, default=5)
    parser.add_argument("--gammas", default="0,0.3", help="discounts of the learned controllers; the first is trained "
                        "online, the others (and the other seeds) retrained on its logged transitions when "
                        "--counterfactual. 0: requests are independent (a contextual bandit)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per discount")
    parser.add_argument("--counterfactual", action=argparse.BooleanOptionalAction, default=True,
                        help="serve each training request under every profile (see `layerwise runtime train --help`)")
    parser.add_argument("--exploration-steps", type=int, default=500)
    parser.add_argument("--train-samples", type=int, default=300)
    parser.add_argument("--test-samples", type=int, default=64)
    parser.add_argument("--oracle-samples", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--load-test-requests", type=int, default=200)
    parser.add_argument("--load-test-concurrency", type=int, default=4)
    parser.add_argument("--load-test-timeout", type=float, default=900.0, help="seconds for the whole load test")
    parser.add_argument("--skip", default="", help="steps already done in DIR: oracle,train,test,serve")
    parser.add_argument("--resume", action="store_true", help="continue a run in DIR: steps whose output is there "
                        "are not run again, and the online training continues from its last episode")
    parser.add_argument("--remark", default="")
    args = parser.parse_args()

    learned = controllers(args)
    if len(learned) > 1 and not args.counterfactual:
        parser.error("several seeds or discounts need --counterfactual: the other controllers are retrained on the "
                     "online controller's log, which only holds every profile's outcome with it (and `runtime "
                     "train --seed` would also draw another prompt split, whose training prompts could be the test's)")
    skip = set(filter(None, args.skip.split(",")))
    online = next(iter(learned.values()))
    shared = ["--model", args.model, "--max-new-tokens", str(args.max_new_tokens),
              "--train-samples", str(args.train_samples), "--load-profile", args.load_profile]
    objective = ["--slo-ms", args.slo_ms, "--slo-penalty", str(args.slo_penalty)] if args.reward == "slo" else []
    if args.resume:  # each step's output is written when the step ends; the online checkpoint after each episode
        done = {"oracle": args.out / "oracle.json", "test": args.out / "test.json", "serve": args.out / "load_test.json"}
        skip |= {step for step, path in done.items() if path.is_file()}
    if "oracle" not in skip:
        cli("runtime", "oracle", *shared, "--out", str(args.out), "--samples", str(args.oracle_samples),
            "--reward", args.reward, *objective, "--profiles", args.profiles)
    if "train" not in skip:
        for (gamma, seed), checkpoint in learned.items():
            if checkpoint == online:
                resume = ["--resume"] if args.resume else []  # continues from the checkpoint's last episode
                cli("runtime", "train", *resume, *shared, "--checkpoint", str(checkpoint), "--episodes", str(args.episodes),
                    "--steps-per-episode", str(args.steps_per_episode), "--exploration-steps",
                    str(args.exploration_steps), "--reward", args.reward, *objective, "--profiles", args.profiles,
                    "--gamma", str(gamma), "--seed", str(seed),
                    "--counterfactual" if args.counterfactual else "--on-policy")
            elif not (args.resume and checkpoint.is_file()):  # written once, when retrained
                cli("runtime", "retrain", "--from", str(online), "--checkpoint", str(checkpoint), "--seed", str(seed),
                    "--gamma", str(gamma))
    if "test" not in skip:
        cli("runtime", "test", *shared, *(f"--checkpoint={path}" for path in learned.values()),
            "--ppl-samples", str(args.test_samples), "--out", str(args.out))
    if "serve" not in skip:
        load_test(args, online)
    write_results(args)


def controllers(args: argparse.Namespace) -> dict[tuple[float, int], Path]:
    """The learned controllers' checkpoints, by (discount, seed); the first is the one trained online."""
    gammas = [float(g) for g in args.gammas.split(",")]
    return {(gamma, seed): args.out / f"ckpt-g{gamma:g}-s{seed}.pt" for gamma in gammas for seed in range(args.seeds)}


def policy_name(checkpoint: Path) -> str:
    """The test's policy name of a controller (``layerwise runtime test`` with several checkpoints)."""
    return f"controller:{checkpoint.stem}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_test(args: argparse.Namespace, checkpoint: Path) -> None:
    """``layerwise serve`` with the trained controller on a loopback port; ``--load-test-requests`` OpenAI
    completions from ``--load-test-concurrency`` clients, a quarter under each load condition, every request
    with an objective from ``--slo-ms``; stops at ``--load-test-timeout`` seconds whatever is left."""
    import httpx

    from layerwise.runtime.load import MachineLoad, parse_load_profile
    from layerwise.runtime.objectives import ObjectiveRange
    from layerwise.runtime.prompts import split_prompts

    port = _free_port()
    command = [str(Path(sys.executable).parent / "layerwise"), "serve", "--model", args.model, "--checkpoint",
               str(checkpoint), "--port", str(port)]
    print("$", " ".join(command), flush=True)
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        _, prompts = split_prompts(args.train_samples, args.test_samples, 0)
        span = ObjectiveRange.parse(args.slo_ms)
        idle_dense = {}  # a relative range's factors apply to each test prompt's idle dense latency, as measured
        if span.relative:
            idle_dense = {r["prompt"]: r["decode_ms"] for r in json.loads((args.out / "test.json").read_text())
                          if r["condition"] == "idle" and r["policy"] == "fixed:none"}
        order = list(range(len(prompts)))
        random.Random(11).shuffle(order)
        conditions = parse_load_profile(args.load_profile)
        per_condition = args.load_test_requests // len(conditions)
        stop_at = time.time() + args.load_test_timeout
        outcomes: list[dict] = []

        def one(index: int, condition: str) -> dict:
            number = order[index % len(order)]
            prompt = prompts[number].text
            objective = span.draw(random.Random(index)) * (idle_dense[number] if span.relative else 1.0)
            if time.time() > stop_at:
                return {"condition": condition, "status": "not sent (time bound)"}
            start = time.perf_counter()
            try:
                response = httpx.post(f"{url}/v1/completions", timeout=max(1.0, stop_at - time.time()), json={
                    "model": args.model, "prompt": prompt, "max_tokens": args.max_new_tokens,
                    "max_latency_ms": objective})
            except httpx.TimeoutException:
                return {"condition": condition, "status": "timed out (time bound)"}
            body = response.json()
            return {"condition": condition, "status": response.status_code, "client_ms": 1000 * (time.perf_counter() - start),
                    "objective_ms": objective, **(body.get("layerwise") or {})}

        for number, condition in enumerate(conditions):
            with MachineLoad(condition):
                time.sleep(1.0)
                with ThreadPoolExecutor(args.load_test_concurrency) as pool:
                    indices = range(number * per_condition, (number + 1) * per_condition)
                    outcomes += list(pool.map(lambda i, c=condition.name: one(i, c), indices))
        metrics = httpx.get(f"{url}/metrics", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    (args.out / "load_test.json").write_text(json.dumps({"outcomes": outcomes, "metrics": metrics}, indent=1))


def write_results(args: argparse.Namespace) -> None:
    import torch

    from layerwise.runtime.analysis import (
        PASSAGE_TOKENS,
        _reward_models,
        dominates,
        estimate_errors,
        fixed_outcomes,
        in_se,
        latency_rule,
        learned_policy,
        mean,
        paired,
        reference_margins,
    )
    from layerwise.runtime.cli import controller_names
    from layerwise.runtime.heads import reward_heads
    from layerwise.runtime.objectives import ObjectiveRange
    from layerwise.runtime.session import WARM_REQUESTS, summarize

    learned = controllers(args)
    names = dict(zip(learned, controller_names(list(learned.values()))))  # (γ, seed) → the test's policy name
    gammas = list(dict.fromkeys(gamma for gamma, _ in learned))
    tests = json.loads((args.out / "test.json").read_text())
    oracle = json.loads((args.out / "oracle.json").read_text())["table"]
    online = torch.load(next(iter(learned.values())), weights_only=False)  # with its replay buffer: load it once
    extra = online["extra"]
    training = extra["records"]
    slo = args.reward == "slo"
    groups = {(row["condition"], row["policy"]): row for row in summarize(tests)}
    conditions = list(dict.fromkeys(c for c, _ in groups))
    policies = list(dict.fromkeys(p for _, p in groups))
    fixed = [p for p in policies if p.startswith("fixed:")]
    rule = "no-learning" if "no-learning" in policies else None
    shown = {**{name: f"controller γ={gamma:g} seed {seed}" for (gamma, seed), name in names.items()},
             **{p: p.removeprefix("fixed:") for p in fixed}, "no-learning": "no-learning rule"}

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.0f}%"

    oracle_rows = [[row["condition"], row["best"], "; ".join(
        f"{name} {value:.2f}" + (f" ({pct(met)} met)" if met is not None else "") for name, value, met in row["ranking"])]
        for row in oracle]
    oracle_differs = len({row["best"] for row in oracle}) > 1

    sections, verdicts, test_best = [], {}, {}
    for condition in conditions:
        best = max(fixed, key=lambda p: groups[(condition, p)]["reward"])
        test_best[condition] = best.removeprefix("fixed:")
        rows = []
        for policy in sorted(policies, key=lambda p: -groups[(condition, p)]["reward"]):
            row = groups[(condition, policy)]
            gap, se, _ = paired(tests, condition, policy, best)
            versus = "" if policy == best else f"{gap:+.3f} ± {se:.3f} ({in_se(gap, se):.1f} SE)"
            rows.append([shown[policy], f"{row['reward']:.3f}", pct(row["attainment"]), f"{row['nll']:.3f}",
                         f"{row['decode_ms']:.0f}", f"{row['seed_reward']:.2f}", versus])
        for policy in [*names.values(), *([rule] if rule else [])]:
            ours = groups[(condition, policy)]
            margins = {p: paired(tests, condition, policy, p) for p in fixed}
            verdicts.setdefault(policy, {})[condition] = {
                "reward": ours["reward"], "attainment": ours["attainment"], "nll": ours["nll"],
                "profiles": ours["profiles"],
                "margins": {p.removeprefix("fixed:"): {"gap": g, "se": se, "n": n} for p, (g, se, n) in margins.items()},
                "smallest_se": min(in_se(g, se) for g, se, _ in margins.values()),
                "beats_every_fixed": all(g > 2 * se for g, se, _ in margins.values()),
                "attainment_goal": (not slo) or (ours["attainment"] >= groups[(condition, best)]["attainment"]
                                                 and ours["nll"] <= groups[(condition, best)]["nll"]),
                "dominated_by": [p.removeprefix("fixed:") for p in fixed if dominates(groups[(condition, p)], ours)],
                **({"against_rule": dict(zip(("gap", "se", "n"), paired(tests, condition, policy, rule)))}
                   if rule and policy != rule else {})}
        mixes = "; ".join(f"{shown[p]}: " + ", ".join(f"{q} ×{k}" for q, k in sorted(
            groups[(condition, p)]["profiles"].items(), key=lambda kv: -kv[1])) for p in [*names.values(), rule] if p)
        n = groups[(condition, best)]["requests"]
        table = markdown_table(["policy", "reward", "objective met", "NLL of reference", "latency (ms)",
                                "seed reward", f"this − {test_best[condition]} (best fixed; paired ± SE)"], rows)
        sections.append(f"**{condition}** ({n} paired requests; profiles chosen: {mixes}):\n\n{table}\n")

    def over_seeds(gamma: float, condition: str, key: str) -> list:
        return [verdicts[names[(g, seed)]][condition][key] for g, seed in names if g == gamma]

    def spread(values: list[float]) -> str:
        return f"{mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean(values):.3f}"

    seed_rows = []
    for gamma in gammas:
        for condition in conditions:
            against_rule = [names[(g, seed)] for g, seed in names if g == gamma]
            rule_gaps = [verdicts[p][condition]["against_rule"] for p in against_rule] if rule else []
            seed_rows.append([f"γ = {gamma:g}", condition, spread(over_seeds(gamma, condition, "reward")),
                              ", ".join(f"{v:.1f}" for v in over_seeds(gamma, condition, "smallest_se")),
                              f"{sum(over_seeds(gamma, condition, 'beats_every_fixed'))}/{len(against_rule)}",
                              ", ".join(f"{g['gap']:+.2f} ({in_se(g['gap'], g['se']):.1f} SE)" for g in rule_gaps)
                              or "–"])
    seed_table = markdown_table(["controller", "load", "reward, mean ± sd over seeds",
                                 "smallest margin over the fixed profiles, per seed (SE)",
                                 "seeds beating every fixed profile by > 2 SE",
                                 "− no-learning rule, per seed (paired)"], seed_rows)

    reference, reference_text = {}, ""
    seen_by = next(iter(names.values()))
    if slo:  # what a state-dependent choice can gain here, beside what the controller gained
        learners = list(_reward_models()) if all(r.get("state") for r in tests) else []
        for condition in conditions:
            hindsight = [max(r["reward"] for r in by.values()) for by in fixed_outcomes(tests, condition, fixed).values()]
            reference[condition] = {
                "rule": reference_margins(tests, condition, fixed, latency_rule(tests, condition, fixed, args.slo_penalty)),
                **{name: reference_margins(tests, condition, fixed,
                                           learned_policy(tests, condition, fixed, name, seen_by=seen_by))
                   for name in learners},
                "per_request_oracle": mean(hindsight)}

        def margins_text(key: str) -> str:
            parts = [f"{c} {v[key]['reward']:.3f}, {v[key]['smallest_margin']['gap']:+.3f} ± "
                     f"{v[key]['smallest_margin']['se']:.3f} against {v[key]['smallest_margin']['against']} "
                     f"({in_se(v[key]['smallest_margin']['gap'], v[key]['smallest_margin']['se']):.1f} SE)"
                     for c, v in reference.items()]
            winners = ", ".join(c for c, v in reference.items() if v[key]["beats_every_fixed"]) or "under no load"
            return "; ".join(parts) + f". Beats every fixed profile by > 2 SE: {winners}"

        learned_text = "".join(
            f"  - Learned from a controller's recorded state ({name} regression of each fixed profile's reward, "
            f"fitted on 3 of 4 folds of the test prompts under that load, the profile predicted best served; "
            f"3 random fold splits averaged): {margins_text(name)}.\n" for name in learners)
        reference_text = (
            "- For reference, what a state-dependent choice can gain here (not policies: each learns the load "
            "from the test itself):\n"
            "  - A rule that fits each fixed profile's latency under the load as a + b·prompt tokens on half of the "
            "test prompts and, on the other half, serves the best-quality profile predicted to meet the objective "
            f"(2 folds): {margins_text('rule')}.\n{learned_text}"
            "  - A per-request oracle (it knows every outcome, the latency noise included): "
            + ", ".join(f"{c} {v['per_request_oracle']:.3f}" for c, v in reference.items()) + ".\n")
    estimates_text, estimates = "", {}
    if all(r.get("state") for r in tests):
        estimates = {c: estimate_errors(tests, c, fixed, online["actions"]) for c in conditions}
        rows = [[c, group, *(f"{100 * (math.exp(v[source][group][k]) - 1):+.0f}%" if k == "bias" else
                             f"{100 * (math.exp(v[source][group][k]) - 1):.0f}%"
                             for source in ("state", "rule") for k in ("bias", "error")),
                 str(v["state"][group]["n"])]
                for c, v in estimates.items() for group in sorted(v["state"])]
        profiles = [p.removeprefix("fixed:") for p in fixed]
        profile_rows = [[c, *(f"{100 * (math.exp(v['profiles'][p]) - 1):+.0f}%" if p in v["profiles"] else "–"
                              for p in profiles),
                         f"{max(v['profiles'].values()) - min(v['profiles'].values()):.2f}"]
                        for c, v in estimates.items() if v["profiles"]]
        estimates_text = (
            "\nHow well each request's latency was known beforehand, on the fixed profiles' test requests: the "
            "controller's estimate (each profile's idle prefill and decoding lines, times the running prefill "
            "and decoding slowdowns and the profile's running factor; read back from the recorded states) and the "
            "reference rule's per-load lines (fitted on the test itself). Bias: median measured/predicted − 1 (+: slower than predicted); error: "
            f"the median absolute. Questions: prompts under {PASSAGE_TOKENS} tokens; passages: from "
            f"{PASSAGE_TOKENS}.\n\n"
            + markdown_table(["load", "prompts", "state bias", "state error", "rule bias", "rule error", "requests"],
                             rows)
            + "\nThe controller's estimate per profile (bias as above, over every prompt; spread: the largest less the "
            "smallest, in log). Start-up timing puts each profile off by its own amount, the same under every load; "
            "each profile's running factor (`SpeedEstimates.factors`) is there to learn it from served requests.\n\n"
            + markdown_table(["load", *profiles, "spread (log)"], profile_rows) + "\n")
    served_by_controllers = [r for r in tests if r["policy"] in names.values()]
    overhead = 100 * mean([r["decide_ms"] / r["decode_ms"] for r in served_by_controllers])
    share = 100 * sum(r["decide_ms"] for r in served_by_controllers) / sum(r["decode_ms"] for r in served_by_controllers)
    overhead_by = {c: 100 * mean([r["decide_ms"] / r["decode_ms"] for r in served_by_controllers if r["condition"] == c])
                   for c in conditions}
    switches: dict[str, list[float]] = {}
    for r in tests:
        if r["policy"].startswith("fixed:"):
            switches.setdefault(r["profile"], []).append(r["switch_ms"])
    switch_rows = [[p, f"{mean(v):.2f}", f"{max(v):.2f}"] for p, v in switches.items()]
    switch_max = max(max(v) for v in switches.values())
    episodes = sorted({r["episode"] for r in training})
    early = mean([r["reward"] for r in training if r["episode"] in episodes[:10]])
    late = mean([r["reward"] for r in training if r["episode"] in episodes[-10:]])

    load_text, load_summary = "", {}
    load_file = args.out / "load_test.json"
    if load_file.is_file():
        load = json.loads(load_file.read_text())
        done = [o for o in load["outcomes"] if o["status"] == 200]
        refused = [o for o in load["outcomes"] if o["status"] == 422]
        other = [o for o in load["outcomes"] if o["status"] not in (200, 422)]
        client = sorted(o["client_ms"] for o in done)
        metrics = load["metrics"]
        per_load = "; ".join(
            f"{name}: {level['requests']} requests, {pct(level['attainment'])} met, "
            + ", ".join(f"{p} ×{k}" for p, k in sorted(level["profiles"].items(), key=lambda kv: -kv[1]))
            for name, level in metrics["by_load"].items())
        by_condition = "; ".join(
            f"{c}: {pct(mean([float(o['met']) for o in done if o['condition'] == c]))} met"
            for c in dict.fromkeys(o["condition"] for o in done))
        load_summary = {"completed": len(done), "refused_422": len(refused), "other": len(other),
                        "client_p50_ms": client[len(client) // 2] if client else None,
                        "client_p95_ms": client[int(0.95 * (len(client) - 1))] if client else None,
                        "metrics": metrics}
        load_text = f"""
Load test (`layerwise serve` with this controller, OpenAI `/v1/completions` over loopback, {args.load_test_concurrency} concurrent clients, {args.load_test_requests} requests, an equal share under each load, objectives from the same range, bounded at {args.load_test_timeout:.0f} s): {len(done)} completed, {len(refused)} refused with 422 (objective impossible even for the fastest profile), {len(other)} other ({', '.join(sorted({str(o['status']) for o in other})) or 'none'}). End-to-end client latency p50 {load_summary['client_p50_ms'] or float('nan'):.0f} ms, p95 {load_summary['client_p95_ms'] or float('nan'):.0f} ms (one model serves one request at a time, so with 4 clients most of it is queueing, which the objective counts). Objective attainment by the tool's load: {by_condition}. `GET /metrics` by the server's own load reading: {per_load}; overall attainment {pct(metrics['objectives']['attainment'])}, mean queue {metrics['mean_queue_ms'] or float('nan'):.0f} ms.
"""

    goal = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731

    def seed_goal(key: str, wanted: bool = True) -> str:
        """Per discount and load: met when every seed meets it, with the count."""
        parts = []
        for gamma in gammas:
            for condition in conditions:
                got = [bool(v) == wanted for v in over_seeds(gamma, condition, key)]
                parts.append(f"γ={gamma:g} {condition} {goal(all(got))} ({sum(got)}/{len(got)} seeds)")
        return "; ".join(parts)

    def rule_goal() -> str:
        parts = []
        for gamma in gammas:
            for condition in conditions:
                gaps = [verdicts[names[(g, seed)]][condition]["against_rule"] for g, seed in names if g == gamma]
                wins = [gap["gap"] > 2 * gap["se"] for gap in gaps]
                parts.append(f"γ={gamma:g} {condition} {goal(all(wins))} ({sum(wins)}/{len(wins)} seeds)")
        return "; ".join(parts)

    rule_text = ""
    if rule:
        quality_file = args.out / "profile_quality.json"
        quality = json.loads(quality_file.read_text()) if quality_file.is_file() else {}
        rule_text = (
            "- The no-learning rule (each request: the best-quality profile whose `SpeedEstimates` prediction in the "
            "state meets the objective, else the one predicted fastest; profiles ranked at start-up by their NLL on "
            "training prompts" + (": " + ", ".join(f"{p} {v:.2f}" for p, v in sorted(quality.items(), key=lambda kv: kv[1]))
                                     if quality else "") + ") beats every fixed profile by > 2 SE: "
            + "; ".join(f"{c} {goal(verdicts[rule][c]['beats_every_fixed'])} (smallest margin "
                        f"{verdicts[rule][c]['smallest_se']:.1f} SE)" for c in conditions) + ".\n"
            f"- Each learned controller beats the no-learning rule by > 2 paired SE: {rule_goal()}.\n")
    training_feedback = (
        f"; every request also served under every other profile (`--counterfactual`), each outcome a transition "
        f"from the same state, so {len(training) * len(fixed)} transitions and no exploration needed"
        if args.counterfactual else f", ε 1 → 0.05 over {args.exploration_steps} requests")
    heads = reward_heads.__doc__ or ""
    head_text = " ".join(heads.split("\n\n")[-1].replace("``", "`").split())  # what each head reads
    gamma_text = ", ".join(f"{g:g}" for g in gammas)
    warm = extra.get("warm_requests", 0)  # absent from checkpoints trained before it existed: none were served
    warm_text = (f" After each episode's load starts, {warm} dense requests, unrecorded, move the running slowdowns "
                 f"to it (the oracle and the test serve {WARM_REQUESTS} after each load starts)." if warm else "")
    reward_text = ("`--reward slo`: the served profile's log-likelihood of the dense model's greedy continuation "
                   "(−NLL, teacher-forced) when the request finishes within its objective, otherwise that minus "
                   f"{args.slo_penalty:g} + 2·overrun/objective nats; objectives drawn log-uniformly from "
                   + (f"{args.slo_ms} per request: factors of the dense model's idle latency for that request (its "
                      "prefill and decoding lines timed at start-up), given to the controller in ms"
                      if ObjectiveRange.parse(args.slo_ms).relative else f"{args.slo_ms} ms per request")
                   if slo else "the seed's `0.6·tokens/s − 0.4·PPL/10`")
    markdown = f"""## Runtime-adaptive pruning (Double DQN controller, {args.model})

Command: `.venv/bin/python benchmarks/runtime.py --out DIR --reward {args.reward} --slo-ms {args.slo_ms} --slo-penalty {args.slo_penalty:g} --episodes {args.episodes} --steps-per-episode {args.steps_per_episode} --gammas {args.gammas} --seeds {args.seeds} {'--counterfactual' if args.counterfactual else '--no-counterfactual'} --exploration-steps {args.exploration_steps} --train-samples {args.train_samples} --test-samples {args.test_samples} --max-new-tokens {args.max_new_tokens}` (runs `layerwise runtime oracle`, `train`{', `retrain`' if args.counterfactual and len(learned) > 1 else ''}, `test`, then a load test of `layerwise serve`). Reward: {reward_text}. The seed's reward (`0.6·tokens/s − 0.4·PPL/10`) is recorded for the same requests. Latency is the whole request (prefill + {args.max_new_tokens} tokens, batch 1, 2 CPU cores, fp32). Loads are the tool's own: `spin1` = 1 process spinning all the time, `spin2` = 2 processes spinning half the time each (at full duty they slowed requests 3-15×, erratically), `memory` = a 4 GiB ballast. Prompts: questions of ARC-e/c, BoolQ, CSQA, SIQA, SciQ, NQ-open, wiki paragraphs and wiki passages up to 1,024 tokens. Profiles: `none` and `{args.profiles}` (sliced views, act importance). State: telemetry, prompt features, the objective, the running prefill and decoding slowdowns and each profile's predicted latency over the objective (its idle lines times the slowdowns and its own running factor, which learns from served requests what start-up timing got wrong about that profile). Heads: {head_text} Training: {len(training)} requests over {len(episodes)} episodes (one load each, cycled){training_feedback}.{warm_text} Controllers: discounts γ = {gamma_text}, {args.seeds} training seeds each; the first (γ = {gammas[0]:g}, seed 0) trained online, the others retrained (`layerwise runtime retrain`) on its logged transitions in their order: with every profile served for every request the log is the same whatever the controller chose, so seeds differ in initial weights and replay sampling, on one set of served requests. γ = 0 with counterfactual outcomes is a contextual bandit: each request's value is its own reward, and the target network and Double-DQN target only matter for γ > 0.

Oracle table (before training, {args.oracle_samples} training prompts per load, every fixed profile; mean reward and objective attainment, best first):

{markdown_table(['load', 'best fixed profile', 'every fixed profile'], oracle_rows)}

The best fixed profile {'differs between conditions' if oracle_differs else 'is the same under every condition'} in this table. On the test's {args.test_samples} prompts per load (below; fixed profiles do not depend on the controllers) it is {', '.join(f'{c} {p}' for c, p in test_best.items())}: {'different between loads' if len(set(test_best.values())) > 1 else 'the same under every load'}.

Test: {args.test_samples} disjoint prompts per load, each served by every learned controller, the no-learning rule and every fixed profile back to back with the same objective.

{chr(10).join(sections)}
Learned controllers over training seeds (reward: mean over a load's test requests; spread: the standard deviation between seeds):

{seed_table}
Goals:
- Each learned controller beats every fixed profile by more than 2 paired standard errors, in every seed: {seed_goal('beats_every_fixed')}.
{rule_text}{reference_text}- Objective attainment ≥ the best fixed profile's at no worse mean quality (NLL), in every seed: {seed_goal('attainment_goal')}.
- Not dominated (no fixed profile has both at least the controller's attainment and at most its NLL, one of them strictly), in every seed: {seed_goal('dominated_by', wanted=False)}. Where the best fixed profile is the dense model, the goal above can only hold by serving it every time, which cannot beat it; this one asks whether any fixed profile does better on both counts.
- Controller overhead ≤ 1% of request time: {goal(overhead <= 1.0)} ({overhead:.2f}% mean of decide/latency per request over every controller's requests; by load {', '.join(f'{c} {v:.2f}%' for c, v in overhead_by.items())}; {share:.2f}% of the controllers' total request time). The decision (telemetry, prompt features, the Q-networks; tokenizing is serving's and left out) runs right after a decode has streamed the model through the caches, and is about 5× slower then than in a warm loop.
- Profile switch ≤ 10 ms: {goal(switch_max <= 10.0)} (max {switch_max:.2f} ms over every test request; mean per profile below).
- Training reward of the online controller, mean of the first 10 episodes → last 10: {early:.3f} → {late:.3f}.

{markdown_table(['profile', 'switch mean (ms)', 'switch max (ms)'], switch_rows)}
{estimates_text}{load_text}"""
    summary = {"oracle": oracle, "test_best_fixed": test_best, "policies": verdicts,
               "controllers": {f"gamma={g:g},seed={seed}": name for (g, seed), name in names.items()},
               "overhead_percent": overhead, "overhead_share_of_time_percent": share, "overhead_by_condition": overhead_by, "switch_max_ms": switch_max,
               "training_reward_first_last": [early, late], "state_dependent_reference": reference,
               "latency_estimates": estimates, "load_test": load_summary,
               "settings": {k: str(v) for k, v in vars(args).items()},
               "per_condition_policy": list(groups.values())}  # the request records stay in DIR/test.json
    write_section("runtime", markdown, summary, args.remark)
    print(markdown)


if __name__ == "__main__":
    main()
