"""OWL and AlphaPruning allocations: exact budget, ranges, direction, options."""

from __future__ import annotations

import pytest

import layerwise
from layerwise.allocate import ALLOCATORS, AllocationContext
from layerwise.models import decoder_linears


def _context(tiny, calibration):
    return AllocationContext(model=tiny.model, linears=decoder_linears(tiny.model), calibration=calibration)


def _block_ratios(allocation, context):
    return {b: allocation.ratios[units[0]] for b, units in context.units_by_block().items()}


@pytest.mark.parametrize("allocator", ["uniform", "owl", "alpha"])
@pytest.mark.parametrize("target", [0.3, 0.7])
def test_budget_is_met_exactly_by_parameter_count(tiny, calibration, allocator, target):
    context = _context(tiny, calibration)
    allocation = ALLOCATORS.get(allocator)(context, layerwise.Budget(sparsity=target))
    sizes = context.sizes()
    zeros = sum(round(allocation.ratios[u] * sizes[u]) for u in sizes)
    assert zeros == round(target * sum(sizes.values()))


def test_owl_range_and_direction(tiny, calibration):
    context = _context(tiny, calibration)
    allocation = ALLOCATORS.get("owl")(context, layerwise.Budget(sparsity=0.7), owl_m=5.0, owl_lambda=0.08)
    block = allocation.details["block_sparsity"]
    outliers = allocation.details["block_metric"]
    assert max(block.values()) - min(block.values()) == pytest.approx(0.16)
    assert all(0.7 - 0.16 <= v <= 0.7 + 0.16 for v in block.values())
    most, fewest = max(outliers, key=outliers.get), min(outliers, key=outliers.get)
    assert block[most] < block[fewest]  # more outliers -> pruned less
    ratios = _block_ratios(allocation, context)
    assert all(abs(ratios[b] - block[b]) < 1e-3 for b in block)


def test_alpha_range_and_direction(tiny, calibration):
    context = _context(tiny, calibration)
    allocation = ALLOCATORS.get("alpha")(context, layerwise.Budget(sparsity=0.5), epsilon=0.2)
    block = allocation.details["block_sparsity"]
    alphas = allocation.details["block_metric"]
    assert max(block.values()) / min(block.values()) == pytest.approx(1.2 / 0.8)
    assert block[max(alphas, key=alphas.get)] == max(block.values())  # higher alpha -> pruned more
    assert set(allocation.details["unit_metric"]) == set(context.linears)


def test_alpha_that_needs_full_layers_is_refused(tiny, calibration):
    context = _context(tiny, calibration)
    with pytest.raises(layerwise.BudgetError, match="outside \\[0, 1\\)"):
        ALLOCATORS.get("alpha")(context, layerwise.Budget(sparsity=0.95), epsilon=0.5)


def test_allocator_options_are_checked_and_aliases_resolve(tiny, calibration):
    with pytest.raises(layerwise.LayerwiseError, match="Allocator 'uniform' does not take --epsilon"):
        layerwise.plan(tiny, layerwise.Budget(sparsity=0.5), "wanda", "uniform", calibration=calibration, epsilon=0.1)
    plan = layerwise.plan(tiny, layerwise.Budget(sparsity=0.5), "wanda_ww", calibration=calibration, epsilon=0.1)
    assert (plan.method, plan.allocator, plan.allocator_params["epsilon"]) == ("wanda", "alpha", 0.1)
