"""Reading a runtime test: paired margins between policies, dominance, and the state-dependent reference
choices that say how much any choice made from the state could gain (``layerwise runtime test`` records)."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np

from .heads import StateLayout
from .objectives import RATIO_CLIP


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
                   repeats: int = 3, seen_by: str = "controller") -> dict[int, float]:
    """The reward per test prompt of a state-dependent choice learned on the test itself: per fixed profile, a
    regression of its reward on the state ``seen_by`` recorded for that prompt (what a controller saw), fitted
    on the other folds of the prompts under this load; the profile predicted best is served. Averaged over
    ``repeats`` random fold splits. Like ``latency_rule`` it learns the load from the test (never seen by a
    controller): if it cannot beat the best fixed profile, no choice made from this state is shown to."""

    served = fixed_outcomes(records, condition, fixed)
    state = {r["prompt"]: r["state"] for r in records
             if r["condition"] == condition and r["policy"] == seen_by and r.get("state")}
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
            if not held:  # fewer prompts than folds
                continue
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


