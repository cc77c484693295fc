"""A kind of plan action is one module: its Action model, how it applies, which units it may name and how a
saved model replays it, each registered there. This file adds one (an MLP's activation swapped for ReLU, a
change of modules that saved weights do not carry) and plan files, apply, save and load take it unchanged."""

from __future__ import annotations

import json
from typing import ClassVar, Literal

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import layerwise
from layerwise.cli import app
from layerwise.models import get_adapter
from layerwise.models.restructure import STRUCTURE_REPLAY
from layerwise.ops.base import OP_UNITS, OPS
from layerwise.plan import ACTIONS, Action, Plan


class ReluAction(Action):
    """Compute one MLP's gate activation with ReLU instead of the model's own."""

    structural: ClassVar[bool] = True
    op: Literal["relu"] = "relu"


def _swap(model: nn.Module, actions: list[Action]) -> None:
    mlps = {get_adapter(model).mlp(b).name: get_adapter(model).mlp(b).module for b in range(get_adapter(model).num_blocks)}
    for action in actions:
        mlps[action.unit].act_fn = nn.ReLU()


@pytest.fixture
def relu_kind(monkeypatch):
    """The new kind's registrations, taken back after the test."""
    def mlp_names(model):
        return {get_adapter(model).mlp(b).name for b in range(get_adapter(model).num_blocks)}

    monkeypatch.setitem(ACTIONS._items, "relu", ReluAction)
    monkeypatch.setitem(OPS._items, "relu", lambda model, actions, context: _swap(model, actions))
    monkeypatch.setitem(OP_UNITS._items, "relu", (mlp_names, "an MLP"))
    monkeypatch.setitem(STRUCTURE_REPLAY._items, "relu", _swap)


def test_a_new_action_kind_is_one_module_and_its_registrations(relu_kind, tmp_path):
    plan_file = tmp_path / "plan.json"
    made = CliRunner().invoke(app, ["plan", "--model", "tiny-llama", "--sparsity", "0.1", "--out", str(plan_file)])
    assert made.exit_code == 0, made.output
    record = json.loads(plan_file.read_text())
    record["actions"] = [{"op": "relu", "unit": "model.layers.1.mlp"}]
    plan_file.write_text(json.dumps(record))
    plan = Plan.load(plan_file)
    assert isinstance(plan.actions[0], ReluAction) and plan.structural_actions() == plan.actions
    assert json.loads(plan.to_json())["actions"] == [{"unit": "model.layers.1.mlp", "op": "relu"}]

    out = tmp_path / "run"
    applied = CliRunner().invoke(app, ["apply", "--plan", str(plan_file), "--model", "tiny-llama", "--out", str(out),
                                       "--seqlen", "64", "--max-windows", "1", "--no-latency"])
    assert applied.exit_code == 0, applied.output
    reloaded = layerwise.load(str(out))  # the saved weights load only onto the replayed modules
    mlps = [get_adapter(reloaded.model).mlp(b).module for b in range(get_adapter(reloaded.model).num_blocks)]
    assert isinstance(mlps[1].act_fn, nn.ReLU) and not isinstance(mlps[0].act_fn, nn.ReLU)
    expected = layerwise.load("tiny-llama")
    _swap(expected.model, plan.actions)
    ids = torch.arange(2, 40)[None]
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, expected.model(ids).logits)
        assert not torch.equal(layerwise.load("tiny-llama").model(ids).logits, expected.model(ids).logits)

    record["actions"] = [{"op": "relu", "unit": "model.layers.1.self_attn"}]
    plan_file.write_text(json.dumps(record))
    refused = CliRunner().invoke(app, ["apply", "--plan", str(plan_file), "--model", "tiny-llama",
                                       "--out", str(tmp_path / "refused"), "--no-latency"])
    assert refused.exit_code == 2 and "not an MLP in this model" in " ".join(refused.stderr.split())


def test_an_unregistered_kind_is_refused_by_name():
    plan = {"model": "m", "architecture": {"model_type": "llama"}, "budget": {"sparsity": 0.5}, "allocator": "uniform",
            "method": "magnitude", "actions": [{"op": "relu", "unit": "model.layers.1.mlp"}]}
    with pytest.raises(layerwise.PlanError, match="Input tag 'relu' found using 'op' does not match any of the "
                                                  "expected tags: 'quantize', 'remove', 'slice', 'sparsify'"):
        Plan.from_json(json.dumps(plan))
