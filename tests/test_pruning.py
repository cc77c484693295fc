"""Uniform allocation and magnitude pruning reach exactly what the plan asks."""

from __future__ import annotations

import pytest
import torch

import layerwise
from layerwise.allocate import exact_counts
from layerwise.models import decoder_linears


@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.5, 0.9])
def test_magnitude_reaches_exact_sparsity_per_matrix(tiny, sparsity):
    before = {n: m.weight.detach().clone() for n, m in decoder_linears(tiny.model).items()}
    plan = layerwise.plan(tiny, layerwise.Budget.for_sparsity(sparsity))
    layerwise.apply(tiny.model, plan)
    total_zeros = total = 0
    for action in plan.actions:
        weight = tiny.model.get_submodule(action.unit).weight
        zeros = int((weight == 0).sum())
        assert zeros == round(action.ratio * weight.numel())
        assert abs(action.ratio - sparsity) <= 1 / weight.numel()
        if zeros:
            original = before[action.unit].abs()
            assert original[weight == 0].max() <= original[weight != 0].min()
            assert torch.equal(weight[weight != 0], before[action.unit][weight != 0])
        total_zeros, total = total_zeros + zeros, total + weight.numel()
    assert total_zeros == round(sparsity * total)


def test_embeddings_and_head_untouched(tiny):
    embed = tiny.model.model.embed_tokens.weight.detach().clone()
    layerwise.apply(tiny.model, layerwise.plan(tiny, layerwise.Budget.for_sparsity(0.8)))
    assert torch.equal(tiny.model.model.embed_tokens.weight, embed)
    assert torch.equal(tiny.model.lm_head.weight, embed)


def test_exact_counts_sum_to_budget():
    sizes = {"a": 7, "b": 13, "c": 101}
    counts = exact_counts(sizes, {"a": 0.3, "b": 0.3, "c": 0.3}, 0.3)
    assert sum(counts.values()) == round(0.3 * 121)
    assert all(abs(counts[u] - 0.3 * sizes[u]) < 1 for u in sizes)


def test_budget_range_is_checked():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(layerwise.BudgetError, match=r"Sparsity must lie in \[0, 1\)"):
            layerwise.Budget.for_sparsity(bad)
