"""OWL (outlier-weighted layerwise sparsity): layers with more activation outliers are pruned less."""

from __future__ import annotations

from typing import Optional

import torch

from ..component_options import ComponentOptions, declares, option
from ..config import Budget
from .base import ALLOCATORS, Allocation, AllocationContext, check_budget, linear_map, per_block_to_units


@torch.no_grad()
def outlier_ratios(context: AllocationContext, m: float) -> dict[int, float]:
    """Per block: % of Wanda scores |W|·‖X‖ above ``m`` x the block's mean score (OWL's layer outlier ratio)."""
    profile = context.require_profile()
    ratios = {}
    for block, units in context.units_by_block().items():
        scores = [context.linears[u].weight.abs().float() * profile.feature_norms(u).float()[None, :] for u in units]
        mean = sum(float(s.sum()) for s in scores) / sum(s.numel() for s in scores)
        above = sum(int((s > m * mean).sum()) for s in scores)
        ratios[block] = 100.0 * above / sum(s.numel() for s in scores)
    return ratios


class OwlOptions(ComponentOptions):
    """OWL: outlier threshold and sparsity range."""

    owl_m: Optional[float] = option("owl: outlier threshold M x mean (default 5).")
    owl_lambda: Optional[float] = option("owl: sparsity range +-lambda (default 0.08).")

@declares(OwlOptions)
@ALLOCATORS.register("owl")
def owl(context: AllocationContext, budget: Budget, owl_m: float = 5.0, owl_lambda: float = 0.08) -> Allocation:
    """Outlier ratios mapped to densities in [1-target-λ, 1-target+λ] around the target (OWL paper: M=5, λ=0.08)."""
    target = check_budget(budget)
    outliers = outlier_ratios(context, owl_m)
    spread = linear_map(outliers, 0.0, 2 * owl_lambda)
    mean_spread = sum(spread.values()) / len(spread)
    block_sparsity = {b: 1.0 - (v - mean_spread + (1.0 - target)) for b, v in spread.items()}
    ratios = per_block_to_units(context, block_sparsity, target, "owl")
    return Allocation(
        ratios=ratios,
        params={"owl_m": owl_m, "owl_lambda": owl_lambda},
        details={"metric": "outlier_ratio_percent", "block_metric": outliers, "block_sparsity": block_sparsity},
    )
