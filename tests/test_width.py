"""Structured width pruning on tiny-llama: importance scores, real slicing and reload, the budget projection,
every allocator's exactness, RL-Refine's sum preservation and the Gymnasium environments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from typer.testing import CliRunner

import layerwise
from layerwise.allocate import WIDTH_ALLOCATORS, WidthContext, Widths, WidthSpace, fit_budget
from layerwise.allocate.rl_allocator import WidthAllocationEnv
from layerwise.allocate.rl_refine import WidthRefineEnv
from layerwise.allocate.rl_training import SearchLog, search_objective
from layerwise.allocate.width_objective import RewardWeights, WidthProxy
from layerwise.cli import app
from layerwise.config import Budget
from layerwise.errors import BudgetError, PlanError
from layerwise.models import get_adapter
from layerwise.ops import architecture_signature
from layerwise.ops.structured import SliceAction
from layerwise.plan import Plan

QUICK = ["--seqlen", "64", "--max-windows", "2", "--nsamples", "8", "--generation-length", "4"]


def _context(tiny, calibration, ratio: float, **space_options) -> WidthContext:
    space = WidthSpace.from_model(tiny.model, ratio, **space_options)
    return WidthContext(tiny.model, space, calibration, calibration.width_scores("taylor", seq_len=32), seed=0)


def _plan(tiny, actions) -> Plan:
    return Plan(model="tiny-llama", architecture=architecture_signature(tiny.model),
                budget=Budget.for_width(0.3), allocator="manual", method="taylor", actions=actions)


def test_taylor_score_is_the_summed_weight_times_gradient(tiny, calibration):
    scores = calibration.width_scores("taylor", seq_len=32)
    model = layerwise.load("tiny-llama").model
    tokens = calibration.tokens()[:, :32]
    for batch in tokens.split(calibration.settings.calib_batch_size):
        (model(input_ids=batch, labels=batch).loss * len(batch)).backward()
    adapter = get_adapter(model)
    linears = adapter.attention(1).linears
    geometry = adapter.head_geometry(1)  # KV group 1: query heads 2-3 (rows 32-63 of q, columns of o), KV head 1
    q_rows = slice(geometry.group_size * geometry.head_dim, 2 * geometry.group_size * geometry.head_dim)
    kv_rows = slice(geometry.head_dim, 2 * geometry.head_dim)
    salience = {role: (lin.weight * lin.weight.grad).abs().detach() for role, lin in linears.items()}
    expected = (salience["q"][q_rows].sum() + salience["k"][kv_rows].sum() + salience["v"][kv_rows].sum()
                + salience["o"][:, q_rows].sum())
    assert float(scores.groups[1][1]) == pytest.approx(float(expected), rel=1e-4)
    mlp = adapter.mlp(2).linears
    with torch.no_grad():
        channel = sum(float((mlp[r].weight * mlp[r].weight.grad).abs()[7].sum()) for r in ("gate", "up")) + \
            float((mlp["down"].weight * mlp["down"].weight.grad).abs()[:, 7].sum())
    assert float(scores.channels[2][7]) == pytest.approx(channel, rel=1e-4)
    assert all(p.grad is None for p in tiny.model.parameters())  # scoring leaves no gradients behind


def test_activation_score_uses_profile_norms(tiny, calibration):
    scores = calibration.width_scores("act")
    norms = calibration.profile().feature_norms("model.layers.3.mlp.down_proj").double()
    weight = get_adapter(tiny.model).mlp(3).linears["down"].weight.detach().double()
    assert torch.allclose(scores.channels[3], norms * weight.norm(dim=0))
    assert scores.groups[0].shape == (2,) and scores.channels[0].shape == (160,)


def test_slicing_shapes_and_reload_give_identical_logits(tiny, calibration, tokens, tmp_path):
    plan = _plan(tiny, [SliceAction(unit="model.layers.1.self_attn", keep=2, seq_len=32),
                        SliceAction(unit="model.layers.2.mlp", keep=96, seq_len=32)])
    layerwise.apply(tiny.model, plan, calibration=calibration)
    adapter = get_adapter(tiny.model)
    q, k, o = (adapter.attention(1).linears[r] for r in ("q", "k", "o"))
    assert (q.out_features, k.out_features, o.in_features) == (32, 16, 32)
    mlp = adapter.mlp(2).linears
    assert (mlp["gate"].out_features, mlp["up"].out_features, mlp["down"].in_features) == (96, 96, 96)
    assert tiny.model.config.layerwise_layer_dims["intermediate_size"] == [160, 160, 96, 160]
    with torch.no_grad():
        before = tiny.model(tokens).logits
    layerwise.save(tiny, tmp_path / "sliced", plan)
    reloaded = layerwise.load(str(tmp_path / "sliced"))
    with torch.no_grad():
        assert torch.equal(reloaded.model(tokens).logits, before)
    assert sum(p.numel() for p in reloaded.model.parameters()) == sum(p.numel() for p in tiny.model.parameters())


def test_sliced_model_computes_what_the_search_proxy_scored(tiny, calibration, tokens):
    """Masking the dropped units (the search's proxy) and slicing them away give the same perplexity."""
    scores = calibration.width_scores("taylor", seq_len=32)
    widths = Widths({0: 1, 3: 1}, {1: 64, 2: 120})
    with WidthProxy(tiny.model, scores, tokens) as proxy:
        masked = proxy.perplexity(widths)
    plan = _plan(tiny, [SliceAction(unit="model.layers.0.self_attn", keep=2, seq_len=32),
                        SliceAction(unit="model.layers.3.self_attn", keep=2, seq_len=32),
                        SliceAction(unit="model.layers.1.mlp", keep=64, seq_len=32),
                        SliceAction(unit="model.layers.2.mlp", keep=120, seq_len=32)])
    layerwise.apply(tiny.model, plan, calibration=calibration)
    with torch.no_grad():
        logits = tiny.model(tokens).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert masked == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_bad_slices_are_plan_errors(tiny, calibration):
    with pytest.raises(PlanError, match="multiple of 2"):
        layerwise.apply(tiny.model, _plan(tiny, [SliceAction(unit="model.layers.0.self_attn", keep=3)]),
                        calibration=calibration)
    with pytest.raises(PlanError, match="has only 160"):
        layerwise.apply(tiny.model, _plan(tiny, [SliceAction(unit="model.layers.0.mlp", keep=200)]),
                        calibration=calibration)
    with pytest.raises(PlanError, match="known methods: act, taylor"):
        layerwise.apply(tiny.model, _plan(tiny, [SliceAction(unit="model.layers.0.mlp", keep=8, method="wanda")]),
                        calibration=calibration)


def test_fit_budget_meets_the_target_within_one_rounding_unit(tiny):
    for ratio in (0.1, 0.2, 0.37, 0.5, 0.8):
        space = WidthSpace.from_model(tiny.model, ratio)
        widths = fit_budget(space, {i: 1 - ratio for i in range(4)}, {i: 1 - ratio for i in range(4)})
        assert abs(space.removed(widths) - space.target_removed) <= space.rounding_unit / 2
        assert all(c % 8 == 0 and 8 <= c <= 160 for c in widths.channels.values())
        assert all(1 <= g <= 2 for g in widths.groups.values())
    heads_only = WidthSpace.from_model(tiny.model, 0.5, mlp_layers=range(0))
    widths = fit_budget(heads_only, {i: 0.5 for i in range(4)}, {})
    assert heads_only.removed(widths) == heads_only.target_removed == 4 * heads_only.group_params
    assert heads_only.rounding_unit == heads_only.group_params


def test_impossible_budgets_and_empty_ranges_are_budget_errors(tiny):
    with pytest.raises(BudgetError, match="cannot be reached"):
        WidthSpace.from_model(tiny.model, 0.9, mlp_layers=range(0))
    with pytest.raises(BudgetError, match="No eligible layers"):
        WidthSpace.from_model(tiny.model, 0.2, attn_layers=range(0), mlp_layers=range(0))


@pytest.mark.parametrize("allocator", ["uniform", "adapt", "rl", "rl-refine"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_every_allocator_meets_the_budget_exactly(tiny, calibration, allocator, ratio):
    context = _context(tiny, calibration, ratio, attn_layers=range(1, 4), mlp_layers=range(0, 3))
    options = {"rl_steps": 48, "rl_proxy_samples": 2, "rl_proxy_seqlen": 32} if allocator.startswith("rl") else {}
    allocation = WIDTH_ALLOCATORS.get(allocator)(context, **options)
    space = context.space
    assert set(allocation.widths.groups) == {1, 2, 3} and set(allocation.widths.channels) == {0, 1, 2}
    assert abs(space.removed(allocation.widths) - space.target_removed) <= space.rounding_unit
    if allocator.startswith("rl"):
        assert allocation.details["rl_curve"], "the training curve has a point per finished episode"
        best = max(p["best_value"] for p in allocation.details["rl_curve"])
        assert allocation.details["best_terms"]["value"] == pytest.approx(best, abs=1e-6)


def test_rl_refine_moves_preserve_the_total_at_every_step(tiny, calibration):
    context = _context(tiny, calibration, 0.4)
    space = context.space
    start = fit_budget(space, {i: 0.6 for i in range(4)}, {i: 0.6 for i in range(4)})
    with search_objective(context, RewardWeights(), 2, 32) as objective:
        env = WidthRefineEnv(space, SearchLog(objective), start, moves=5, block=16)
        env.reset(seed=0)
        rng = np.random.default_rng(0)
        valid = 0
        for _ in range(40):
            _, _, _, truncated, _ = env.step(env.action_space.sample() if rng.random() < 0.5 else
                                             np.array([1, rng.integers(4), rng.integers(4)]))
            assert space.removed(env.current) == space.removed(start)
            valid += env.current != start
            if truncated:
                env.reset()
    assert valid > 0, "some random moves were legal and changed the allocation"


def test_the_environments_pass_gymnasiums_checker(tiny, calibration):
    context = _context(tiny, calibration, 0.3)
    with search_objective(context, RewardWeights(), 2, 32) as objective:
        log = SearchLog(objective)
        allocation_env = WidthAllocationEnv(context.space, log, context.scores)
        check_env(allocation_env, skip_render_check=True)
        start = fit_budget(context.space, {i: 0.7 for i in range(4)}, {i: 0.7 for i in range(4)})
        check_env(WidthRefineEnv(context.space, log, start, moves=4, block=16), skip_render_check=True)
        # every finished allocation episode lands on the budget, whatever the policy chose
        for seed in range(3):
            allocation_env.reset(seed=seed)
            done = False
            while not done:
                _, _, done, _, info = allocation_env.step(allocation_env.action_space.sample())
            assert abs(context.space.removed(log.best_widths) - context.space.target_removed) <= context.space.rounding_unit


def test_rl_search_is_seeded_and_writes_nothing_outside(tiny, calibration, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where SB3's default logger would make its folder
    runs = [WIDTH_ALLOCATORS.get("rl")(_context(tiny, calibration, 0.3), rl_steps=32, rl_proxy_samples=2,
                                       rl_proxy_seqlen=32).widths for _ in range(2)]
    assert runs[0] == runs[1]
    assert list(tmp_path.iterdir()) == []


def test_compress_width_cli_records_costs_speed_and_reloads(tmp_path):
    out = tmp_path / "width"
    result = CliRunner().invoke(app, ["compress", "--model", "tiny-llama", "--structure", "width", "--allocator",
                                      "rl-refine", "--pruning-ratio", "0.3", "--rl-steps", "16", "--refine-moves", "4",
                                      "--refine-block", "16", "--out", str(out), *QUICK])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    metrics = record["metrics"]
    assert metrics["costs"]["parameters"] == metrics["parameters"]
    assert metrics["dense_costs"]["parameters"] == metrics["dense"]["parameters"]
    for proxy in ("flops", "weight_bytes", "peak_activation_bytes", "kv_bytes"):
        assert proxy in record["plan"]["prediction"]["normalised"]
    assert metrics["flop_speedup"]["decode"] > 1.0 and metrics["speedup"]["decode"] > 0
    assert len(metrics["rl_curve"]) == 4 and len(metrics["widths"]["channels"]) == 4
    prediction = record["plan"]["prediction"]
    assert abs(prediction["removed_parameters"] - prediction["target_removed"]) <= prediction["rounding_unit"]
    assert "FLOP-predicted / measured" in result.output
    reloaded = layerwise.load(str(out))
    assert sum(p.numel() for p in reloaded.model.parameters()) == metrics["parameters"]


@pytest.mark.parametrize("args, message", [
    (["--structure", "width"], "needs --pruning-ratio"),
    (["--structure", "width", "--pruning-ratio", "0.3", "--attn-layers", "3-4"], "must look like 0:30"),
    (["--structure", "width", "--pruning-ratio", "0.3", "--attn-layers", "2:9"], "does not select layers"),
    (["--structure", "width", "--pruning-ratio", "0.3", "--method", "wanda"], "Unknown width importance 'wanda'"),
    (["--structure", "width", "--pruning-ratio", "0.3", "--allocator", "owl"], "Unknown width allocator 'owl'"),
    (["--structure", "width", "--pruning-ratio", "0.3", "--allocator", "uniform", "--rl-steps", "5"],
     "does not take --rl-steps"),
    (["--structure", "width", "--pruning-ratio", "0.3", "--allocator", "rl", "--rl-steps", "2"],
     "shorter than one episode"),
    (["--structure", "width", "--pruning-ratio", "0.3", "--allocator", "rl", "--rl-algo", "dqn"],
     "Unknown RL algorithm 'dqn'"),
])
def test_width_cli_errors_are_one_sentence(tmp_path, args, message):
    result = CliRunner().invoke(app, ["compress", "--model", "tiny-llama", "--out", str(tmp_path / "o"), *QUICK, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o").exists()


def test_report_draws_kept_widths_and_the_rl_training_curve(tmp_path):
    import base64
    import re

    from layerwise.report.figures import width_map

    out = tmp_path / "rl"
    result = CliRunner().invoke(app, ["compress", "--model", "tiny-llama", "--structure", "width", "--allocator", "rl",
                                      "--pruning-ratio", "0.4", "--rl-steps", "40", "--out", str(out), *QUICK])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    layer_map = width_map(record)
    widths = record["metrics"]["widths"]
    assert layer_map.rows == ["attention heads", "FFN channels"]
    assert layer_map.values[0] == [g / 2 for g in widths["groups"]]
    assert layer_map.values[1] == [c / 160 for c in widths["channels"]]
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0
    page = (out / "report.html").read_text()
    assert "RL training curve" in page and "kept width" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # Pareto, RL curve, kept widths (no empty sparsity map for a width run)
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)


def test_lora_recovery_is_merged_and_reported(tmp_path):
    out = tmp_path / "recovered"
    result = CliRunner().invoke(app, ["compress", "--model", "tiny-llama", "--structure", "width", "--pruning-ratio",
                                      "0.4", "--recover-steps", "12", "--recover-lr", "0.01", "--out", str(out), *QUICK])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "result.json").read_text())["metrics"]
    recovery = metrics["recovery"]
    assert len(recovery["losses"]) == 12 and recovery["rank"] == 8
    assert recovery["losses"][-1] < recovery["losses"][0]
    assert recovery["ppl_after"] == metrics["ppl"] and recovery["ppl_before"] != metrics["ppl"]
    assert "after LoRA" in result.output
    reloaded = layerwise.load(str(out))
    names = [name for name, _ in reloaded.model.named_parameters()]
    assert not any("lora" in name for name in names)  # merged: the saved model has the pruned shapes only
    assert sum(p.numel() for p in reloaded.model.parameters()) == metrics["parameters"]


def test_a_width_plan_file_applies_to_a_fresh_model_like_compress(tmp_path):
    runner = CliRunner()
    common = ["--model", "tiny-llama", "--structure", "width", "--allocator", "adapt", "--pruning-ratio", "0.3",
              "--seqlen", "64", "--nsamples", "8"]
    assert runner.invoke(app, ["plan", *common, "--out", str(tmp_path / "plan.json")]).exit_code == 0
    plan = Plan.load(tmp_path / "plan.json")
    assert {a.op for a in plan.actions} == {"slice"} and plan.details["calibration"]["nsamples"] == 8
    evaluation = ["--max-windows", "2", "--generation-length", "4"]
    applied = runner.invoke(app, ["apply", "--plan", str(tmp_path / "plan.json"), "--model", "tiny-llama", "--seqlen",
                                  "64", "--nsamples", "8", "--out", str(tmp_path / "applied"), *evaluation])
    assert applied.exit_code == 0, applied.output
    compressed = runner.invoke(app, ["compress", *common, "--out", str(tmp_path / "compressed"), *evaluation])
    assert compressed.exit_code == 0, compressed.output
    records = [json.loads((tmp_path / d / "result.json").read_text())["metrics"] for d in ("applied", "compressed")]
    assert records[0]["ppl"] == records[1]["ppl"] and records[0]["parameters"] == records[1]["parameters"]


def test_uniform_wishes_give_every_layer_the_same_width(tiny):
    for ratio in (0.2, 0.5):
        space = WidthSpace.from_model(tiny.model, ratio)
        widths = fit_budget(space, {i: 1 - ratio for i in range(4)}, {i: 1 - ratio for i in range(4)})
        assert len(set(widths.groups.values())) == 1
        assert max(widths.channels.values()) - min(widths.channels.values()) <= 8


def test_taylor_scores_work_under_no_grad(tiny, calibration):
    with torch.no_grad():
        scores = calibration.width_scores("taylor", seq_len=16)
    assert all(float(s.sum()) > 0 for s in scores.channels.values())


def _random_curve(context, allocator: str, steps: int) -> list[dict]:
    """The same environment as the allocator builds, stepped with uniformly random actions."""
    from layerwise.allocate.adapt import adapt_keep_fractions

    with search_objective(context, RewardWeights(), 2, 32) as objective:
        log = SearchLog(objective)
        if allocator == "rl":
            env = WidthAllocationEnv(context.space, log, context.scores)
        else:
            keep, _ = adapt_keep_fractions(context, 0.2)
            start = fit_budget(context.space, {i: keep[i] for i in context.space.groups},
                               {i: keep[i] for i in context.space.channels})
            env = WidthRefineEnv(context.space, log, start, moves=4, block=16)
        env.reset(seed=0)
        env.action_space.seed(0)
        for _ in range(steps):
            _, _, done, truncated, _ = env.step(env.action_space.sample())
            if done or truncated:
                env.reset()
    return log.curve


@pytest.mark.parametrize("allocator", ["rl", "rl-refine"])
def test_rl_width_policies_learn_better_than_random_actions(tiny, calibration, allocator):
    """Same environment and number of steps: the trained policy's last episodes earn more than random actions'
    episodes do on average (a flipped reward or a policy that never learns fails this, while keeping the best
    sample, which both do, would not show it)."""
    steps = 1200
    options = {"rl_steps": steps, "rl_proxy_samples": 2, "rl_proxy_seqlen": 32}
    if allocator == "rl-refine":
        options.update(refine_moves=4, refine_block=16)
    learned = WIDTH_ALLOCATORS.get(allocator)(_context(tiny, calibration, 0.3), **options).details["rl_curve"]
    random = _random_curve(_context(tiny, calibration, 0.3), allocator, steps)
    late = sum(e["episode_reward"] for e in learned[-40:]) / 40
    random_mean = sum(e["episode_reward"] for e in random) / len(random)
    assert late > random_mean, (late, random_mean)
