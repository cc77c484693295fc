"""Reading a runtime test: the state-dependent reference choices, latency estimates and dominance, on records
whose latencies follow known lines."""

from __future__ import annotations

import pytest

from layerwise.runtime import analysis as module


def test_latency_rule_serves_the_best_profile_predicted_to_meet_the_objective():
    """``slow`` takes 300 + tokens ms at NLL 1, ``fast`` 100 + tokens ms at NLL 3: the rule learns both lines on
    one half of the prompts and, on the other, serves slow where the objective allows it, fast where only fast
    fits, and where neither does, the smaller predicted NLL + penalty. The lines are exact, so each choice is
    the better outcome of the two, and its reward is the served profile's own."""
    records = []
    for prompt in range(40):
        tokens = 10 * prompt
        objective = [250 + tokens, 500 + tokens, 50 + tokens][prompt % 3]  # fast only, both, neither
        for policy, base, nll in (("fixed:slow", 300, 1.0), ("fixed:fast", 100, 3.0)):
            latency = base + tokens
            met = latency <= objective
            records.append({"condition": "idle", "policy": policy, "prompt": prompt, "prompt_tokens": tokens,
                            "decode_ms": latency, "objective_ms": objective, "nll": nll, "met": met,
                            "reward": -nll - (0 if met else 8 + 2 * (latency - objective) / objective)})
    rewards = module.latency_rule(records, "idle", ["fixed:slow", "fixed:fast"], penalty=8.0)
    assert sorted(rewards) == list(range(40))
    outcomes = {(r["prompt"], r["policy"]): r["reward"] for r in records}
    chosen = {}
    for prompt, reward in rewards.items():
        slow, fast = outcomes[(prompt, "fixed:slow")], outcomes[(prompt, "fixed:fast")]
        assert reward == max(slow, fast), prompt
        chosen[prompt] = "slow" if reward == slow else "fast"
    assert chosen[0] == "fast" and chosen[1] == "slow"  # only fast fits; both fit


def test_estimate_errors_read_the_controllers_prediction_back_from_the_state_and_compare_the_rule():
    """Latencies on exact lines in the prompt's length: the rule's cross-fitted lines are exact (error 0). The
    state predicted questions exactly and passages 20% too fast (bias +25%); a ratio at the clip is left out."""
    import math

    from layerwise.runtime.heads import StateLayout

    layout, actions = StateLayout(2), ["none", "fast"]
    records = []
    for prompt in range(40):
        tokens = 20 * prompt
        for profile, base in (("none", 300), ("fast", 100)):
            latency, objective = base + tokens, 400.0
            predicted = latency if tokens < module.PASSAGE_TOKENS else 0.8 * latency
            state = [0.0] * layout.size
            state[layout.predicted[actions.index(profile)]] = (2.0 if prompt == 39 else
                                                                math.log(predicted / objective))
            records.append({"condition": "idle", "policy": f"fixed:{profile}", "profile": profile, "prompt": prompt,
                            "prompt_tokens": tokens, "decode_ms": latency, "objective_ms": objective, "nll": 1.0,
                            "state": state})
    errors = module.estimate_errors(records, "idle", ["fixed:none", "fixed:fast"], actions)
    assert errors["state"]["questions"]["bias"] == pytest.approx(0.0, abs=1e-12)
    assert errors["state"]["passages"]["bias"] == pytest.approx(math.log(1.25))
    assert errors["state"]["passages"]["error"] == pytest.approx(math.log(1.25))
    assert errors["state"]["questions"]["n"] == 2 * 13 and errors["state"]["passages"]["n"] == 2 * 27 - 2
    assert errors["rule"]["passages"]["error"] == pytest.approx(0.0, abs=1e-9)
    assert errors["rule"]["questions"]["n"] + errors["rule"]["passages"]["n"] == 80
    assert errors["profiles"] == pytest.approx({"none": math.log(1.25), "fast": math.log(1.25)})
    for record in records:  # start-up timing that put "fast" 10% too fast: its own median, not "none"'s
        if record["profile"] == "fast" and abs(record["state"][layout.predicted[1]]) < 2.0:
            record["state"][layout.predicted[1]] -= math.log(1.1)
    shifted = module.estimate_errors(records, "idle", ["fixed:none", "fixed:fast"], actions)["profiles"]
    assert shifted == pytest.approx({"none": math.log(1.25), "fast": math.log(1.25 * 1.1)})


@pytest.mark.parametrize("learner", ["linear", "boosted trees"])
def test_learned_policy_picks_by_state_where_no_fixed_profile_can(learner):
    """Which profile pays depends on the sign of one state feature (``a`` when it is positive, ``b`` otherwise,
    each 1 nat better there and 1 worse elsewhere): each fixed profile averages -1, the learned choice, fitted on
    other folds, gets ~0 and beats both by far more than 2 SE, reading the controller's state, not the fixed
    serves'. A reference whose choice is only as good as the best fixed profile does not beat it."""
    import random

    rng = random.Random(0)
    records = []
    for prompt in range(64):
        signal = rng.uniform(-1, 1)
        noise = [rng.uniform(-1, 1) for _ in range(3)]
        records.append({"condition": "spin", "policy": "controller", "prompt": prompt, "reward": 0.0,
                        "state": [signal, *noise]})
        for name, good in (("fixed:a", signal > 0), ("fixed:b", signal <= 0)):
            records.append({"condition": "spin", "policy": name, "prompt": prompt,
                            "reward": (0.0 if good else -2.0) + 0.1 * rng.uniform(-1, 1),
                            "state": [rng.uniform(-1, 1) for _ in range(4)]})  # a fixed serve's own: not read
    rewards = module.learned_policy(records, "spin", ["fixed:a", "fixed:b"], learner)
    assert sorted(rewards) == list(range(64))
    margins = module.reference_margins(records, "spin", ["fixed:a", "fixed:b"], rewards)
    assert margins["reward"] > -0.3 and margins["beats_every_fixed"]
    assert margins["smallest_margin"]["gap"] > 0.6
    same_as_a = {r["prompt"]: r["reward"] for r in records if r["policy"] == "fixed:a"}
    assert not module.reference_margins(records, "spin", ["fixed:a", "fixed:b"], same_as_a)["beats_every_fixed"]


def test_a_fixed_profile_dominates_only_when_better_or_equal_on_both_counts():
    ours = {"attainment": 0.5, "nll": 2.0}
    assert module.dominates({"attainment": 0.6, "nll": 2.0}, ours)
    assert module.dominates({"attainment": 0.5, "nll": 1.9}, ours)
    assert not module.dominates({"attainment": 0.5, "nll": 2.0}, ours)  # equal on both: not better
    assert not module.dominates({"attainment": 0.9, "nll": 2.1}, ours)  # more met at worse quality
