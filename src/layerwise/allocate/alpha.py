"""AlphaPruning: heavier-tailed layers (lower ESD alpha) are better trained and are pruned less."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..calibration.esd import spectral_metrics
from ..component_options import ComponentOptions, declares, option
from ..config import Budget
from .base import ALLOCATORS, Allocation, AllocationContext, check_budget, linear_map, per_block_to_units


class AlphaOptions(ComponentOptions):
    """AlphaPruning: the ESD metric, the sparsity spread and where metric values are cached."""

    epsilon: Optional[float] = option("alpha: sparsities span [1-eps, 1+eps] x target (default 0.2).")
    esd_metric: Optional[str] = option("alpha: the spectral metric, alpha_peak (default) or alpha_mid.",
                                       param="metric")
    metric_cache: Optional[Path] = option("alpha: directory caching metric values.")


@declares(AlphaOptions)
@ALLOCATORS.register("alpha")
def alpha(context: AllocationContext, budget: Budget, epsilon: float = 0.2, metric: str = "alpha_peak",
          metric_cache: str | None = None) -> Allocation:
    """Per-block mean alpha mapped linearly to [1-ε, 1+ε], scaled so the weighted mean sparsity is the target."""
    target = check_budget(budget)
    values, cached = spectral_metrics(context.model, context.linears, metric, metric_cache)
    blocks = context.units_by_block()
    block_alpha = {b: sum(values[u] for u in units) / len(units) for b, units in blocks.items()}
    factors = linear_map(block_alpha, 1.0 - epsilon, 1.0 + epsilon)
    sizes = context.sizes()
    weighted = sum(factors[b] * sizes[u] for b, units in blocks.items() for u in units)
    scale = target * sum(sizes.values()) / weighted if weighted > 0 else 0.0
    block_sparsity = {b: f * scale for b, f in factors.items()}
    ratios = per_block_to_units(context, block_sparsity, target, "alpha")
    return Allocation(
        ratios=ratios,
        params={"epsilon": epsilon, "metric": metric},
        details={"metric": metric, "unit_metric": values, "block_metric": block_alpha,
                 "block_sparsity": block_sparsity, "metric_from_cache": cached},
    )
