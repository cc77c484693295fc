"""Wanda, SparseGPT and N:M reach exactly what the plan asks; SparseGPT reconstructs better than Wanda."""

from __future__ import annotations

import pytest
import torch

import layerwise
from layerwise.models import decoder_linears
from layerwise.ops.masks import prune_lowest_per_row
from layerwise.ops.sparsegpt import sparsegpt_prune


def _plan(tiny, calibration, method, allocator="uniform", sparsity=0.5, **kw):
    return layerwise.plan(tiny, layerwise.Budget.for_sparsity(sparsity), method, allocator, calibration=calibration, **kw)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("allocator", ["uniform", "owl", "alpha"])
def test_reached_sparsity_equals_plan_per_matrix(tiny, calibration, method, allocator):
    plan = _plan(tiny, calibration, method, allocator, sparsity=0.6)
    layerwise.apply(tiny.model, plan, calibration)
    total = zeros = 0
    for action in plan.actions:
        weight = tiny.model.get_submodule(action.unit).weight
        assert int((weight == 0).sum()) == round(action.ratio * weight.numel()), action.unit
        total, zeros = total + weight.numel(), zeros + int((weight == 0).sum())
    assert zeros == round(0.6 * total)


def test_wanda_prunes_lowest_activation_weighted_scores_per_row(tiny, calibration):
    unit = "model.layers.1.mlp.down_proj"
    original = tiny.model.get_submodule(unit).weight.detach().clone()
    plan = _plan(tiny, calibration, "wanda-one-pass")
    layerwise.apply(tiny.model, plan, calibration)
    weight = tiny.model.get_submodule(unit).weight
    scores = original.abs() * calibration.profile().feature_norms(unit).float()[None, :]
    assert (weight == 0).sum(dim=1).tolist() == [original.shape[1] // 2] * original.shape[0]
    for row in range(weight.shape[0]):
        pruned, kept = scores[row][weight[row] == 0], scores[row][weight[row] != 0]
        assert pruned.max() <= kept.min()


def test_per_row_counts_spread_a_remainder():
    weight = torch.ones(4, 10)
    prune_lowest_per_row(weight, torch.rand(4, 10), 22)
    assert (weight == 0).sum(dim=1).tolist() == [6, 6, 5, 5]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_pattern(tiny, calibration, method):
    plan = _plan(tiny, calibration, method, nm="2:4")
    assert {a.pattern for a in plan.actions} == {"2:4"} and {a.ratio for a in plan.actions} == {0.5}
    layerwise.apply(tiny.model, plan, calibration)
    for linear in decoder_linears(tiny.model).values():
        groups = (linear.weight == 0).reshape(linear.out_features, -1, 4).sum(-1)
        assert bool((groups == 2).all())


def test_nm_needs_uniform_and_matching_budget(tiny, calibration):
    with pytest.raises(layerwise.BudgetError, match="use it with --allocator uniform"):
        _plan(tiny, calibration, "wanda", "owl", nm="2:4")
    with pytest.raises(layerwise.BudgetError, match="means sparsity 0.5"):
        _plan(tiny, calibration, "wanda", sparsity=0.7, nm="2:4")


def test_sparsegpt_reconstructs_better_than_wanda():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(96, 96, generator=generator) / 96**0.5 + torch.eye(96)
    x = torch.randn(4096, 96, generator=generator) @ mixing  # correlated inputs, as in real layers
    weight = torch.randn(48, 96, generator=generator)
    hessian = 2 * x.t() @ x / x.shape[0]
    count = weight.numel() // 2

    wanda = weight.clone()
    prune_lowest_per_row(wanda, weight.abs() * x.norm(dim=0)[None, :], count)
    obs = weight.clone()
    sparsegpt_prune(obs, hessian, count, block_size=32)

    def error(w):
        return float(((x @ weight.t() - x @ w.t()) ** 2).mean())

    assert int((obs == 0).sum()) == count
    assert error(obs) < 0.8 * error(wanda)


def test_wanda_is_sequential_each_block_scored_on_the_pruned_blocks_outputs(calibration):
    """Block 0 sees the unpruned inputs (the one-pass and the sequential masks agree there); block 1's norms come
    from block 0's pruned outputs, as Wanda's own code computes them, so its mask follows those norms."""
    from layerwise.calibration import CalibrationSource

    masks = {}
    for method in ("wanda", "wanda-one-pass"):
        loaded = layerwise.load("tiny-llama")
        source = CalibrationSource(loaded, calibration.settings)
        layerwise.apply(loaded.model, _plan(loaded, source, method), source)
        masks[method] = {name: (m.weight == 0) for name, m in decoder_linears(loaded.model).items()}
    first, second = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    assert torch.equal(masks["wanda"][first], masks["wanda-one-pass"][first])
    assert not torch.equal(masks["wanda"][second], masks["wanda-one-pass"][second])
    # the norms block 1 was scored with: its inputs once block 0 is pruned (block 1 itself unpruned)
    reference = layerwise.load("tiny-llama")
    for name, module in decoder_linears(reference.model).items():
        if name.startswith("model.layers.0."):
            module.weight.data[masks["wanda"][name]] = 0
    norms = CalibrationSource(reference, calibration.settings).profile().feature_norms(second).float()
    original = decoder_linears(reference.model)[second].weight.detach()
    scores = original.abs() * norms[None, :]
    kept, pruned = ~masks["wanda"][second], masks["wanda"][second]
    for row in range(scores.shape[0]):
        assert scores[row][pruned[row]].max() <= scores[row][kept[row]].min()
