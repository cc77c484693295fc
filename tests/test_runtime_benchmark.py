"""The runtime benchmark's state-dependent reference rule, on records whose latencies follow known lines."""

from __future__ import annotations

from benchmark_scripts import benchmark_module


def test_latency_rule_serves_the_best_profile_predicted_to_meet_the_objective():
    """``slow`` takes 300 + tokens ms at NLL 1, ``fast`` 100 + tokens ms at NLL 3: the rule learns both lines on
    one half of the prompts and, on the other, serves slow where the objective allows it, fast where only fast
    fits, and where neither does, the smaller predicted NLL + penalty. The lines are exact, so each choice is
    the better outcome of the two, and its reward is the served profile's own."""
    module = benchmark_module("runtime")
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
