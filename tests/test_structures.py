"""A structure is one class: this file adds a small one (every MLP sliced to the same width, kept channels by
weight norm) and the CLI, the planner, apply, save/load and result.json take it with no other change."""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
import torch
from typer.testing import CliRunner

import layerwise
from layerwise.cli import app
from layerwise.config import Budget
from layerwise.errors import BudgetError
from layerwise.models import LoadedModel, get_adapter
from layerwise.ops.structured import SliceAction
from layerwise.plan import Plan
from layerwise.structures import STRUCTURES, PlanRequest, Structure, register


class EvenMlp(Structure):
    """Every MLP keeps the same share of its channels, those with the largest down-projection column norms."""

    name = "even-mlp"

    def budget(self, options) -> Budget:
        return Budget.for_width(options.pruning_ratio)

    def validate(self, method, allocator, budget, nm, params) -> tuple[str, str, None]:
        if params:
            raise BudgetError(f"even-mlp takes no options (got {', '.join(sorted(params))}).")
        return "norm", "uniform", None

    def plan(self, request: PlanRequest) -> Plan:
        adapter = get_adapter(request.loaded.model)
        actions = []
        for block in range(adapter.num_blocks):
            down = adapter.mlp(block).linears["down"].weight
            keep = max(8, round(down.shape[1] * (1 - request.budget.pruning_ratio)))
            kept = sorted(torch.topk(down.norm(dim=0), keep).indices.tolist())
            actions.append(SliceAction(unit=adapter.mlp(block).name, keep=keep, method="act", kept=kept))
        return request.plan(actions, {}, {})

    def metrics(self, plan: Plan, loaded: LoadedModel, dense_latency: Any, extra: dict) -> dict:
        return {"mlp_widths": [get_adapter(loaded.model).ffn_width(b) for b in range(get_adapter(loaded.model).num_blocks)]}


@pytest.fixture
def even_mlp():
    register(EvenMlp)
    yield STRUCTURES.get("even-mlp")
    del STRUCTURES._items["even-mlp"]


def test_a_new_structure_is_one_class_and_its_registration(even_mlp, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["compress", "--model", "tiny-llama", "--structure", "even-mlp",
                                      "--pruning-ratio", "0.5", "--out", str(out), "--seqlen", "64", "--max-windows",
                                      "1", "--no-latency"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    widths = record["metrics"]["mlp_widths"]
    assert len(set(widths)) == 1 and widths[0] < get_adapter(layerwise.load("tiny-llama").model).ffn_width(0)
    reloaded = layerwise.load(str(out))  # the reloaded model has the plan's widths and the run's perplexity
    adapter = get_adapter(reloaded.model)
    assert [adapter.ffn_width(b) for b in range(adapter.num_blocks)] == widths
    again = layerwise.evaluate(reloaded, layerwise.RunSettings(seqlen=64, max_windows=1))
    assert again.ppl == pytest.approx(record["metrics"]["ppl"], rel=1e-5)
    refused = CliRunner().invoke(app, ["plan", "--model", "tiny-llama", "--structure", "even-mlp", "--pruning-ratio",
                                       "0.5", "--attn-layers", "0:2", "--out", str(tmp_path / "p.json")])
    assert refused.exit_code == 2 and "even-mlp takes no options (got attn_layers)" in " ".join(refused.stderr.split())


def test_the_structures_own_their_budgets_and_calibration_defaults():
    from layerwise.options import PlanOptions

    assert STRUCTURES.names() == ["depth", "joint", "quant", "unstructured", "width"]
    assert PlanOptions(structure="depth", target_speedup=1.3).budget() == Budget(target_speedup=1.3)
    assert PlanOptions(structure="width", pruning_ratio=0.2).budget() == Budget(pruning_ratio=0.2)
    assert PlanOptions(structure="quant", avg_bits=4.5).budget() == Budget(avg_bits=4.5)
    assert PlanOptions().budget() == Budget(sparsity=0.5)
    assert PlanOptions(structure="joint", max_bytes=10**6, target_speedup=1.5).budget() == Budget(
        max_bytes=10**6, target_speedup=1.5)
    assert STRUCTURES.get("depth").calibration_defaults == {"nsamples": 8, "calib_seqlen": 256}
    assert STRUCTURES.get("joint").calibration_defaults == {"nsamples": 4, "calib_seqlen": 128}


def test_an_option_of_one_allocator_is_refused_for_another():
    from layerwise.errors import SettingsError
    from layerwise.options import PlanOptions

    with pytest.raises(SettingsError, match=r"Allocator 'alpha' does not take --sprint-metric \(an option of sprint\)"):
        PlanOptions(allocator="alpha", sprint_metric="l2-token").allocator_params()
    with pytest.raises(SettingsError, match=r"does not take --rl-steps \(an option of rl, rl-refine\)"):
        PlanOptions(structure="width", allocator="adapt", rl_steps=10).allocator_params()
    assert PlanOptions(method="wanda_ww", esd_metric="alpha_mid").allocator_params() == {"metric": "alpha_mid"}
    assert PlanOptions(structure="width", allocator="rl_refine", rl_steps=10).allocator_params() == {"rl_steps": 10}


def test_a_new_allocator_is_one_function_with_its_options_and_its_registration(tiny):
    from layerwise.allocate import WIDTH_ALLOCATORS, WidthAllocation, fit_budget
    from layerwise.component_options import ComponentOptions, declares, option

    class FrontOptions(ComponentOptions):
        front_share: Optional[float] = option("front: share of the removal taken from the first half of the layers.")

    @declares(FrontOptions)
    def front(context, front_share: float = 0.75) -> WidthAllocation:
        """Prune the first half of the layers harder than the second."""
        blocks = sorted(context.space.groups)
        ratio = context.space.target_removed / context.space.eligible_parameters
        keep = {b: 1 - ratio * (2 * front_share if i < len(blocks) / 2 else 2 * (1 - front_share))
                for i, b in enumerate(blocks)}
        return WidthAllocation(fit_budget(context.space, keep, keep), {"front_share": front_share}, {}, 0.0)

    WIDTH_ALLOCATORS.add("front", front)
    try:
        calibration = layerwise.calibration(tiny, layerwise.RunSettings(nsamples=2, calib_seqlen=16))
        plan = layerwise.plan(tiny, Budget(pruning_ratio=0.4), "taylor", "front", calibration=calibration,
                              structure="width", taylor_seq_len=16, front_share=0.9)
        widths = plan.details["widths"]["channels"]
        assert widths[0] < widths[-1] and plan.allocator_params["front_share"] == 0.9
    finally:
        del WIDTH_ALLOCATORS._items["front"]
