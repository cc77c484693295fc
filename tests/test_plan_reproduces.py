"""A plan is a complete artifact: it records the calibration windows it was computed on (and which width
units it keeps), so `plan` then `apply` rebuilds exactly the model `compress` builds, whatever calibration
settings `apply` is run with, and refuses calibration options that contradict the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import layerwise
from layerwise.cli import app
from layerwise.errors import PlanError
from layerwise.pipeline import apply_plan_file, compress, plan_to_file
from layerwise.plan import Plan

# (structure, method, allocator, budget, options): one row per kind of action that calibrates when applied
PLANS = {
    "wanda": ("unstructured", "wanda", "uniform", layerwise.Budget(sparsity=0.5), {}),
    "sparsegpt": ("unstructured", "sparsegpt", "owl", layerwise.Budget(sparsity=0.5), {}),
    "width": ("width", "taylor", "adapt", layerwise.Budget(pruning_ratio=0.3), {"taylor_seq_len": 16}),
    # not latency-aware: the order would follow two separate timings of the same model otherwise
    "depth": ("depth", None, "sprint", layerwise.Budget(remove_sublayers=2),
              {"num_candidate_sublayers": 2, "latency_aware": False}),
    "gptq": ("quant", "gptq", "uniform", layerwise.Budget(), {"bits": "4", "group_size": 32}),
}
# what compress and plan calibrate on; apply is run with other calibration settings on purpose
PLANNED = dict(nsamples=6, calib_seqlen=48, calib_batch_size=3, seed=1)
OTHER = dict(nsamples=9, calib_seqlen=40, calib_batch_size=2, seed=5)
EVALUATION = dict(seqlen=64, max_windows=2, latency=None)


def _logits(run_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    loaded = layerwise.load(str(run_dir))
    with torch.no_grad():
        return loaded.model(input_ids=tokens).logits


@pytest.mark.parametrize("name", sorted(PLANS))
def test_plan_then_apply_with_other_calibration_settings_equals_compress(tmp_path, tokens, name):
    structure, method, allocator, budget, options = PLANS[name]
    planned = layerwise.RunSettings(**PLANNED, **EVALUATION)
    compress("tiny-llama", budget, method, allocator, planned, tmp_path / "compressed", structure=structure, **options)
    plan = plan_to_file("tiny-llama", budget, tmp_path / "plan.json", method, allocator, planned,
                        structure=structure, **options)
    assert plan.calibration.nsamples == 6 and plan.calibration.seqlen == 48 and plan.calibration.seed == 1
    if structure == "width":
        assert all(action.kept is not None and len(action.kept) for action in plan.actions)
    record = apply_plan_file("tiny-llama", tmp_path / "plan.json", layerwise.RunSettings(**OTHER, **EVALUATION),
                             tmp_path / "applied")
    assert record["calibration"]["nsamples"] == 6 and record["calibration"]["seqlen"] == 48
    compressed = json.loads((tmp_path / "compressed" / "result.json").read_text())
    assert record["plan"]["actions"] == compressed["plan"]["actions"]
    assert torch.equal(_logits(tmp_path / "applied", tokens), _logits(tmp_path / "compressed", tokens))


def test_apply_refuses_calibration_options_that_contradict_the_plan(tmp_path):
    plan_file = tmp_path / "plan.json"
    common = ["--model", "tiny-llama", "--method", "wanda", "--sparsity", "0.5"]
    assert CliRunner().invoke(app, ["plan", *common, "--nsamples", "6", "--out", str(plan_file)]).exit_code == 0
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["apply", "--model", "tiny-llama", "--plan", str(plan_file), "--nsamples", "12",
                                      "--out", str(out), "--max-windows", "1", "--no-latency"])
    assert result.exit_code == 2, result.output
    assert "computed on calibration with --nsamples 6" in " ".join(result.stderr.split())
    assert not out.exists()
    agreeing = CliRunner().invoke(app, ["apply", "--model", "tiny-llama", "--plan", str(plan_file), "--nsamples",
                                        "6", "--seqlen", "64", "--out", str(out), "--max-windows", "1",
                                        "--no-latency"])
    assert agreeing.exit_code == 0, agreeing.output


def test_apply_refuses_a_plan_whose_calibration_windows_cannot_be_drawn_again(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"Paragraph {i} says something about topic {i % 7}." * 20 for i in range(40)))
    settings = layerwise.RunSettings(calib_text=str(text), nsamples=4, calib_seqlen=32, seqlen=64, max_windows=1,
                                     latency=None)
    plan_to_file("tiny-llama", layerwise.Budget(sparsity=0.5), tmp_path / "plan.json", "wanda", settings=settings)
    text.write_text("\n\n".join(f"Other words, other windows {i}." * 20 for i in range(40)))
    with pytest.raises(PlanError, match="differ from those the plan was computed on"):
        apply_plan_file("tiny-llama", tmp_path / "plan.json", settings, tmp_path / "applied")
    assert not (tmp_path / "applied").exists()


def test_plans_written_before_the_calibration_record_still_apply(tmp_path):
    settings = layerwise.RunSettings(nsamples=4, calib_seqlen=32, seqlen=64, max_windows=1, latency=None)
    plan = plan_to_file("tiny-llama", layerwise.Budget(pruning_ratio=0.3), tmp_path / "plan.json", "taylor", "adapt",
                        settings, structure="width", taylor_seq_len=16)
    old = json.loads(plan.to_json())
    del old["calibration"]
    for action in old["actions"]:
        del action["kept"]
    Plan.model_validate(old).save(tmp_path / "old.json")
    apply_plan_file("tiny-llama", tmp_path / "old.json", settings, tmp_path / "old-run")
    apply_plan_file("tiny-llama", tmp_path / "plan.json", settings, tmp_path / "new-run")
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(tmp_path / "old-run", tokens), _logits(tmp_path / "new-run", tokens))


def test_a_slice_listing_units_the_sublayer_lacks_is_refused(tiny):
    plan = layerwise.plan(tiny, layerwise.Budget(pruning_ratio=0.3), "taylor", "uniform",
                          calibration=layerwise.calibration(tiny, layerwise.RunSettings(nsamples=2, calib_seqlen=16)),
                          structure="width", taylor_seq_len=16)
    action = next(a for a in plan.actions if a.unit.endswith("mlp"))
    beyond = action.model_copy(update={"kept": list(range(action.keep - 1)) + [10_000]})
    broken = plan.model_copy(update={"actions": [beyond]})
    with pytest.raises(PlanError, match="kept channels"):
        layerwise.apply(layerwise.load("tiny-llama").model, broken)
