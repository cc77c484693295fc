"""Runtime-adaptive pruning benchmark: on smollm2-135m, under the tool's own machine loads, with a latency
objective drawn per request (``--reward slo``, the default) or the seed's linear reward (``--reward linear``).

1. ``layerwise runtime oracle``: before training, every fixed profile under every load: which is best where;
2. ``layerwise runtime train``: the Double DQN controller;
3. ``layerwise runtime test``: disjoint test prompts, each served by the controller and by every fixed profile
   back to back under each load, with the same objective (paired);
4. a loopback load test of ``layerwise serve`` (OpenAI ``/v1/completions``, concurrency 4, 200 requests, bounded
   time), a quarter of the requests under each load.

Run: `.venv/bin/python benchmarks/runtime.py --out DIR` on an otherwise idle machine (speeds are measured; the
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
    parser.add_argument("--gamma", type=float, default=0.0, help="0: requests are independent (a contextual bandit)")
    parser.add_argument("--counterfactual", action=argparse.BooleanOptionalAction, default=True,
                        help="serve each training request under every profile (see `layerwise runtime train --help`)")
    parser.add_argument("--exploration-steps", type=int, default=500)
    parser.add_argument("--heads", default="lean", help="what each reward term's head reads (layerwise runtime train --heads)")
    parser.add_argument("--train-samples", type=int, default=300)
    parser.add_argument("--test-samples", type=int, default=64)
    parser.add_argument("--oracle-samples", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--load-test-requests", type=int, default=200)
    parser.add_argument("--load-test-concurrency", type=int, default=4)
    parser.add_argument("--load-test-timeout", type=float, default=900.0, help="seconds for the whole load test")
    parser.add_argument("--skip", default="", help="steps already done in DIR: oracle,train,test,serve")
    parser.add_argument("--remark", default="")
    args = parser.parse_args()

    skip = set(filter(None, args.skip.split(",")))
    checkpoint = args.out / "ckpt.pt"
    shared = ["--model", args.model, "--max-new-tokens", str(args.max_new_tokens),
              "--train-samples", str(args.train_samples), "--load-profile", args.load_profile]
    objective = ["--slo-ms", args.slo_ms, "--slo-penalty", str(args.slo_penalty)] if args.reward == "slo" else []
    if "oracle" not in skip:
        cli("runtime", "oracle", *shared, "--out", str(args.out), "--samples", str(args.oracle_samples),
            "--reward", args.reward, *objective, "--profiles", args.profiles)
    if "train" not in skip:
        cli("runtime", "train", *shared, "--checkpoint", str(checkpoint), "--episodes", str(args.episodes),
            "--steps-per-episode", str(args.steps_per_episode), "--exploration-steps", str(args.exploration_steps),
            "--reward", args.reward, *objective, "--profiles", args.profiles, "--gamma", str(args.gamma), "--heads", args.heads,
            "--counterfactual" if args.counterfactual else "--on-policy")
    if "test" not in skip:
        cli("runtime", "test", *shared, "--checkpoint", str(checkpoint), "--ppl-samples", str(args.test_samples),
            "--out", str(args.out))
    if "serve" not in skip:
        load_test(args, checkpoint)
    write_results(args)


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


def verdict(gap: float, se: float) -> str:
    """How a paired difference reads against two standard errors."""
    if gap > 2 * se:
        return "better"
    if gap < -2 * se:
        return "worse"
    return "no difference (within 2 SE)"


def in_se(gap: float, se: float) -> float:
    """A paired gap in standard errors (±inf when the pairs never differ in spread but do in mean)."""
    if se > 0:
        return gap / se
    return 0.0 if gap == 0 else float("inf") if gap > 0 else float("-inf")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def paired(records: list[dict], condition: str, ours: str, theirs: str, key: str = "reward") -> tuple[float, float, int]:
    """Mean and standard error of ``ours − theirs`` over the prompts both served under ``condition``."""
    mine = {r["prompt"]: r[key] for r in records if r["condition"] == condition and r["policy"] == ours}
    other = {r["prompt"]: r[key] for r in records if r["condition"] == condition and r["policy"] == theirs}
    gaps = [mine[p] - other[p] for p in mine if p in other]
    se = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
    return mean(gaps), se, len(gaps)


def dominates(theirs: dict, ours: dict) -> bool:
    """Whether a policy's summary row has at least our objective attainment and at most our NLL, one strictly."""
    return (theirs["attainment"] >= ours["attainment"] and theirs["nll"] <= ours["nll"]
            and (theirs["attainment"] > ours["attainment"] or theirs["nll"] < ours["nll"]))


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of y on x."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = mean(xs), mean(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / spread if spread else 0.0
    return my - slope * mx, slope


def fixed_outcomes(records: list[dict], condition: str, fixed: list[str]) -> dict[int, dict[str, dict]]:
    """Each test prompt's record under every fixed profile, for the prompts every one of them served."""
    served: dict[int, dict[str, dict]] = {}
    for r in records:
        if r["condition"] == condition and r["policy"] in fixed:
            served.setdefault(r["prompt"], {})[r["policy"]] = r
    return {prompt: by for prompt, by in served.items() if len(by) == len(fixed)}


def cross_fitted(served: dict[int, dict[str, dict]], fixed: list[str]) -> dict[int, tuple[dict, dict]]:
    """Per prompt, each fixed profile's request latency predicted by a line a + b·prompt tokens, and its mean NLL,
    both fitted on the other half of the prompts (2 folds by parity)."""
    prompts = sorted(served)
    out = {}
    for fold in (0, 1):
        fitting = [served[p] for i, p in enumerate(prompts) if i % 2 == fold]
        lines = {f: _line([(by[f]["prompt_tokens"], by[f]["decode_ms"]) for by in fitting]) for f in fixed}
        nll = {f: mean([by[f]["nll"] for by in fitting]) for f in fixed}
        for prompt in (p for i, p in enumerate(prompts) if i % 2 != fold):
            tokens = served[prompt][fixed[0]]["prompt_tokens"]
            out[prompt] = ({f: lines[f][0] + lines[f][1] * tokens for f in fixed}, nll)
    return out


def latency_rule(records: list[dict], condition: str, fixed: list[str], penalty: float,
                 overrun: float = 2.0) -> dict[int, float]:
    """The reward per test prompt of a state-dependent reference rule that knows each profile's latency under
    this load (``cross_fitted`` lines, fitted on the test's other half): it takes the profile with the lowest
    mean NLL predicted to meet the objective, else the one with the least predicted penalty. Its reward is what
    that profile got on the request. It sees the load through the test itself, which no controller does: a
    reference for how much a state-dependent choice can gain here, not a policy."""
    served = fixed_outcomes(records, condition, fixed)
    rewards = {}
    for prompt, (predicted, nll) in cross_fitted(served, fixed).items():
        limit = served[prompt][fixed[0]]["objective_ms"]
        meeting = [f for f in fixed if predicted[f] <= limit]
        choice = (min(meeting, key=nll.get) if meeting else
                  min(fixed, key=lambda f: nll[f] + penalty + overrun * (predicted[f] - limit) / limit))
        rewards[prompt] = served[prompt][choice]["reward"]
    return rewards


def _reward_models() -> dict[str, object]:
    """The learners of ``learned_policy``: a linear and a non-linear regression of reward on the state."""
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {"linear": lambda: make_pipeline(StandardScaler(), RidgeCV(alphas=[10.0 ** k for k in range(-2, 4)])),
            "boosted trees": lambda: GradientBoostingRegressor(n_estimators=100, max_depth=2, learning_rate=0.05,
                                                               subsample=0.8, random_state=0)}


def learned_policy(records: list[dict], condition: str, fixed: list[str], learner: str, folds: int = 4,
                   repeats: int = 3) -> dict[int, float]:
    """The reward per test prompt of a state-dependent choice learned on the test itself: per fixed profile, a
    regression of its reward on the controller's recorded state for that prompt (what the controller saw), fitted
    on the other folds of the prompts under this load; the profile predicted best is served. Averaged over
    ``repeats`` random fold splits. Like ``latency_rule`` it learns the load from the test (never seen by a
    controller): if it cannot beat the best fixed profile, no choice made from this state is shown to."""
    import numpy as np

    served = fixed_outcomes(records, condition, fixed)
    state = {r["prompt"]: r["state"] for r in records
             if r["condition"] == condition and r["policy"] == "controller" and r.get("state")}
    prompts = [p for p in sorted(served) if p in state]
    features = np.array([state[p] for p in prompts], dtype=float)
    rewards = np.array([[served[p][f]["reward"] for f in fixed] for p in prompts])
    make = _reward_models()[learner]
    got = np.zeros(len(prompts))
    for repeat in range(repeats):
        order = list(range(len(prompts)))
        random.Random(repeat).shuffle(order)
        for fold in range(folds):
            held = order[fold::folds]
            fitting = sorted(set(order) - set(held))
            predicted = np.column_stack([make().fit(features[fitting], rewards[fitting, j]).predict(features[held])
                                         for j in range(len(fixed))])
            got[held] += rewards[held, predicted.argmax(axis=1)] / repeats
    return dict(zip(prompts, got.tolist()))


def reference_margins(records: list[dict], condition: str, fixed: list[str], rewards: dict[int, float]) -> dict:
    """A reference choice's mean reward and its smallest paired margin over the fixed profiles."""
    tagged = records + [{"condition": condition, "policy": "reference", "prompt": p, "reward": v}
                        for p, v in rewards.items()]
    margins = {p: paired(tagged, condition, "reference", p) for p in fixed}
    smallest = min(margins, key=lambda p: in_se(*margins[p][:2]))
    return {"reward": mean(list(rewards.values())),
            "smallest_margin": {"against": smallest.removeprefix("fixed:"), "gap": margins[smallest][0],
                                "se": margins[smallest][1]},
            "beats_every_fixed": all(g > 2 * se for g, se, _ in margins.values())}


PASSAGE_TOKENS = 256  # prompts at least this long are mostly prefill; shorter ones mostly decoding steps


def estimate_errors(records: list[dict], condition: str, fixed: list[str], actions: list[str]) -> dict[str, dict]:
    """How well request latency was known beforehand, on the fixed profiles' test requests under ``condition``:
    log(measured / predicted) for the controller's state (each profile's idle lines times the running slowdowns,
    read back from the recorded state; ratios at the clip are left out) and for the reference rule's lines.
    Per prompt group (questions below ``PASSAGE_TOKENS`` tokens, passages from it): the median (bias, + slower
    than predicted) and the median absolute error."""
    from layerwise.runtime.heads import StateLayout
    from layerwise.runtime.objectives import RATIO_CLIP

    predicted_at = StateLayout(len(actions)).predicted
    served = fixed_outcomes(records, condition, fixed)
    rule = cross_fitted(served, fixed)
    errors: dict[str, dict[str, list[float]]] = {"state": {}, "rule": {}}
    by_profile: dict[str, list[float]] = {}
    for prompt, by in served.items():
        for policy, record in by.items():
            group = "passages" if record["prompt_tokens"] >= PASSAGE_TOKENS else "questions"
            ratio = record["state"][predicted_at[actions.index(record["profile"])]] if record.get("state") else None
            if ratio is not None and abs(ratio) < RATIO_CLIP:
                error = math.log(record["decode_ms"] / (record["objective_ms"] * math.exp(ratio)))
                errors["state"].setdefault(group, []).append(error)
                by_profile.setdefault(record["profile"], []).append(error)
            if prompt in rule and rule[prompt][0][policy] > 0:
                errors["rule"].setdefault(group, []).append(math.log(record["decode_ms"] / rule[prompt][0][policy]))
    return {**{source: {group: {"bias": statistics.median(values), "error": statistics.median(abs(v) for v in values),
                                "n": len(values)} for group, values in groups.items()}
               for source, groups in errors.items()},
            "profiles": {profile: statistics.median(values) for profile, values in by_profile.items()}}


def write_results(args: argparse.Namespace) -> None:
    import torch

    from layerwise.runtime.objectives import ObjectiveRange
    from layerwise.runtime.session import WARM_REQUESTS, summarize

    tests = json.loads((args.out / "test.json").read_text())
    oracle = json.loads((args.out / "oracle.json").read_text())["table"]
    checkpoint = torch.load(args.out / "ckpt.pt", weights_only=False)  # with its replay buffer: load it once
    extra = checkpoint["extra"]
    training = extra["records"]
    slo = args.reward == "slo"
    groups = {(row["condition"], row["policy"]): row for row in summarize(tests)}
    conditions = list(dict.fromkeys(c for c, _ in groups))
    policies = list(dict.fromkeys(p for _, p in groups))
    fixed = [p for p in policies if p != "controller"]

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.0f}%"

    oracle_rows = [[row["condition"], row["best"], "; ".join(
        f"{name} {value:.2f}" + (f" ({pct(met)} met)" if met is not None else "") for name, value, met in row["ranking"])]
        for row in oracle]
    oracle_differs = len({row["best"] for row in oracle}) > 1

    sections, verdicts, attain_ok, test_best = [], {}, {}, {}
    for condition in conditions:
        best = max(fixed, key=lambda p: groups[(condition, p)]["reward"])
        test_best[condition] = best.removeprefix("fixed:")
        margins = {p: paired(tests, condition, "controller", p) for p in fixed}
        rows = []
        for policy in sorted(policies, key=lambda p: -groups[(condition, p)]["reward"]):
            row = groups[(condition, policy)]
            gap = "" if policy == "controller" else "{:+.3f} ± {:.3f} ({})".format(
                *margins[policy][:2], verdict(*margins[policy][:2]))
            rows.append([policy.removeprefix("fixed:"), f"{row['reward']:.3f}", pct(row["attainment"]),
                         f"{row['nll']:.3f}", f"{row['decode_ms']:.0f}", f"{row['seed_reward']:.2f}", gap])
        verdicts[condition] = {p.removeprefix("fixed:"): {"gap": g, "se": se, "n": n, "beats": g > 2 * se}
                               for p, (g, se, n) in margins.items()}
        ours, theirs = groups[(condition, "controller")], groups[(condition, best)]
        attain_ok[condition] = {
            "best_fixed": best.removeprefix("fixed:"), "controller_attainment": ours["attainment"],
            "best_fixed_attainment": theirs["attainment"], "controller_nll": ours["nll"], "best_fixed_nll": theirs["nll"],
            "met": (not slo) or (ours["attainment"] >= theirs["attainment"] and ours["nll"] <= theirs["nll"]),
            "dominated_by": [p.removeprefix("fixed:") for p in fixed if dominates(groups[(condition, p)], ours)]}
        mix = ", ".join(f"{p} ×{n}" for p, n in sorted(ours["profiles"].items(), key=lambda kv: -kv[1]))
        n = min(m[2] for m in margins.values())
        table = markdown_table(["policy", "reward", "objective met", "NLL of reference", "latency (ms)",
                                "seed reward", "controller − this policy (paired ± SE)"], rows)
        sections.append(f"**{condition}** ({n} paired requests; controller chose {mix}):\n\n{table}\n")

    beats_all = {c: all(v["beats"] for v in verdicts[c].values()) for c in conditions}
    reference, reference_text = {}, ""
    if slo:  # what a state-dependent choice can gain here, beside what the controller gained
        learners = list(_reward_models()) if all(r.get("state") for r in tests) else []
        for condition in conditions:
            hindsight = [max(r["reward"] for r in by.values()) for by in fixed_outcomes(tests, condition, fixed).values()]
            reference[condition] = {
                "rule": reference_margins(tests, condition, fixed, latency_rule(tests, condition, fixed, args.slo_penalty)),
                **{name: reference_margins(tests, condition, fixed, learned_policy(tests, condition, fixed, name))
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
            f"  - Learned from the controller's recorded state ({name} regression of each fixed profile's reward, "
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
        estimates = {c: estimate_errors(tests, c, fixed, checkpoint["actions"]) for c in conditions}
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
    controller = [r for r in tests if r["policy"] == "controller"]
    overhead = 100 * mean([r["decide_ms"] / r["decode_ms"] for r in controller])
    share = 100 * sum(r["decide_ms"] for r in controller) / sum(r["decode_ms"] for r in controller)
    overhead_by = {c: 100 * mean([r["decide_ms"] / r["decode_ms"] for r in controller if r["condition"] == c])
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
Load test (`layerwise serve` with this controller, OpenAI `/v1/completions` over loopback, {args.load_test_concurrency} concurrent clients, {args.load_test_requests} requests, an equal share under each load, objectives from the same range, bounded at {args.load_test_timeout:.0f} s): {len(done)} completed, {len(refused)} refused with 422 (objective impossible even for the fastest profile), {len(other)} other ({', '.join(sorted({str(o['status']) for o in other})) or 'none'}). End-to-end client latency p50 {load_summary['client_p50_ms'] or float('nan'):.0f} ms, p95 {load_summary['client_p95_ms'] or float('nan'):.0f} ms (one model serves one request at a time, so with 4 clients most of it is queueing, which the objective counts). Objective attainment by the tool's load: {by_condition}. `GET /metrics` by the server's own load reading: {per_load}; overall attainment {pct(metrics['objectives']['attainment'])}, mean queue {metrics['mean_queue_ms']:.0f} ms.
"""

    goal = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    training_feedback = (
        f"; every request also served under every other profile (`--counterfactual`), each outcome a transition "
        f"from the same state, so {len(training) * len(fixed)} transitions and no exploration needed"
        if args.counterfactual else f", ε 1 → 0.05 over {args.exploration_steps} requests")
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
    from layerwise.runtime.heads import HEAD_LAYOUTS

    head_text = " ".join((HEAD_LAYOUTS.get(args.heads).__doc__ or "").replace("``", "`").split())
    markdown = f"""## Runtime-adaptive pruning (Double DQN controller, {args.model})

Command: `.venv/bin/python benchmarks/runtime.py --out DIR --reward {args.reward} --slo-ms {args.slo_ms} --slo-penalty {args.slo_penalty:g} --episodes {args.episodes} --steps-per-episode {args.steps_per_episode} --gamma {args.gamma:g} --heads {args.heads} {'--counterfactual' if args.counterfactual else '--on-policy'} --exploration-steps {args.exploration_steps} --train-samples {args.train_samples} --test-samples {args.test_samples} --max-new-tokens {args.max_new_tokens}` (runs `layerwise runtime oracle`, `train`, `test`, then a load test of `layerwise serve`). Reward: {reward_text}. The seed's reward (`0.6·tokens/s − 0.4·PPL/10`) is recorded for the same requests. Latency is the whole request (prefill + {args.max_new_tokens} tokens, batch 1, 2 CPU cores, fp32). Loads are the tool's own: `spin1` = 1 process spinning all the time, `spin2` = 2 processes spinning half the time each (at full duty they slowed requests 3-15×, erratically), `memory` = a 4 GiB ballast. Prompts: questions of ARC-e/c, BoolQ, CSQA, SIQA, SciQ, NQ-open, wiki paragraphs and wiki passages up to 1,024 tokens. Profiles: `none` and `{args.profiles}` (sliced views, act importance). State: telemetry, prompt features, the objective, the running prefill and decoding slowdowns and each profile's predicted latency over the objective (its idle lines times the slowdowns and its own running factor, which learns from served requests what start-up timing got wrong about that profile). Heads (`--heads {args.heads}`): {head_text} Training: {len(training)} requests over {len(episodes)} episodes (one load each, cycled), γ = {args.gamma:g}{training_feedback}.{warm_text}

Oracle table (before training, {args.oracle_samples} training prompts per load, every fixed profile; mean reward and objective attainment, best first):

{markdown_table(['load', 'best fixed profile', 'every fixed profile'], oracle_rows)}

The best fixed profile {'differs between conditions' if oracle_differs else 'is the same under every condition'} in this table. On the test's {args.test_samples} prompts per load (below; fixed profiles do not depend on the controller) it is {', '.join(f'{c} {p}' for c, p in test_best.items())}: {'different between loads' if len(set(test_best.values())) > 1 else 'the same under every load'}.

Test: {args.test_samples} disjoint prompts per load, each served by the controller and by every fixed profile back to back with the same objective.

{chr(10).join(sections)}
Goals:
- Controller beats every fixed profile by more than 2 paired standard errors: {'; '.join(f"{c} {goal(beats_all[c])} (smallest margin {min(in_se(v['gap'], v['se']) for v in verdicts[c].values()):.1f} SE)" for c in conditions)}.
{reference_text}- Objective attainment ≥ the best fixed profile's at no worse mean quality (NLL): {'; '.join(f"{c} {goal(a['met'])} ({pct(a['controller_attainment'])} vs {a['best_fixed']} {pct(a['best_fixed_attainment'])}, NLL {a['controller_nll']:.3f} vs {a['best_fixed_nll']:.3f})" for c, a in attain_ok.items())}.
- Not dominated: no fixed profile has both at least the controller's attainment and at most its NLL (one of them strictly): {'; '.join(f"{c} {goal(not a['dominated_by'])}" + (f" (by {', '.join(a['dominated_by'])})" if a['dominated_by'] else "") for c, a in attain_ok.items())}. Where the best fixed profile is the dense model, the goal above can only hold by serving it every time, which cannot beat it; this one asks whether any fixed profile does better on both counts.
- Controller overhead ≤ 1% of request time: {goal(overhead <= 1.0)} ({overhead:.2f}% mean of decide/latency per request; by load {', '.join(f'{c} {v:.2f}%' for c, v in overhead_by.items())}; {share:.2f}% of the controller's total request time). The decision (telemetry, prompt features, the Q-networks; tokenizing is serving's and left out) runs right after a decode has streamed the model through the caches, and is about 5× slower then than in a warm loop.
- Profile switch ≤ 10 ms: {goal(switch_max <= 10.0)} (max {switch_max:.2f} ms over every test request; mean per profile below).
- Training reward, mean of the first 10 episodes → last 10: {early:.3f} → {late:.3f}.

{markdown_table(['profile', 'switch mean (ms)', 'switch max (ms)'], switch_rows)}
{estimates_text}{load_text}"""
    summary = {"oracle": oracle, "test_best_fixed": test_best, "verdicts": verdicts, "attainment": attain_ok, "beats_every_fixed": beats_all,
               "overhead_percent": overhead, "overhead_share_of_time_percent": share, "overhead_by_condition": overhead_by, "switch_max_ms": switch_max,
               "training_reward_first_last": [early, late], "state_dependent_reference": reference,
               "latency_estimates": estimates, "load_test": load_summary,
               "settings": {k: str(v) for k, v in vars(args).items()},
               "per_condition_policy": list(groups.values())}  # the request records stay in DIR/test.json
    write_section("runtime", markdown, summary, args.remark)
    print(markdown)


if __name__ == "__main__":
    main()
