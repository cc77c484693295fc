"""Plan JSON round-trip and the checks that reject malformed or mismatched plans."""

from __future__ import annotations

import json

import pytest

import layerwise
from layerwise import Plan, PlanError


@pytest.fixture
def plan(tiny) -> Plan:
    return layerwise.plan(tiny, layerwise.Budget.for_sparsity(0.5))


def test_json_round_trip(plan, tmp_path):
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again == plan
    assert again.to_json() == plan.to_json()
    raw = json.loads(path.read_text())
    assert raw["actions"][0] == {"unit": "model.layers.0.self_attn.q_proj", "op": "sparsify",
                                 "ratio": 0.5, "method": "magnitude"}
    assert raw["budget"] == {"sparsity": 0.5} and raw["allocator"] == "uniform"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: "{not json", "not valid JSON"),
        (lambda d: json.dumps({**d, "actions": [{**d["actions"][0], "ratio": 1.2}]}), "actions.0.sparsify.ratio"),
        (lambda d: json.dumps({**d, "actions": [{**d["actions"][0], "op": "explode"}]}),
         "actions.0: Input tag 'explode' found using 'op' does not match any of the expected tags"),
        (lambda d: json.dumps({k: v for k, v in d.items() if k != "budget"}), "budget: Field required"),
    ],
)
def test_malformed_plans_raise_plan_error(plan, mutate, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_json(mutate(json.loads(plan.to_json())))


def test_plan_for_other_model_is_rejected(plan, neox_dir):
    neox = layerwise.load(neox_dir)
    with pytest.raises(PlanError, match="made for a model with model_type=llama"):
        layerwise.apply(neox.model, plan)


def test_plan_with_unknown_unit_or_method_is_rejected(tiny, plan):
    bad_unit = plan.model_copy(update={"actions": [plan.actions[0].model_copy(update={"unit": "model.layers.9.mlp.up_proj"})]})
    with pytest.raises(PlanError, match="names unit 'model.layers.9.mlp.up_proj'"):
        layerwise.apply(tiny.model, bad_unit)
    bad_method = plan.model_copy(update={"actions": [plan.actions[0].model_copy(update={"method": "psychic"})]})
    with pytest.raises(PlanError, match="method 'psychic'"):
        layerwise.apply(tiny.model, bad_method)
