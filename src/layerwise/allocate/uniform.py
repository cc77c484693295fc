"""Uniform allocation: every decoder linear gets the target sparsity (rounded so the total is exact)."""

from __future__ import annotations

from ..config import Budget
from .base import ALLOCATORS, Allocation, AllocationContext, check_budget, exact_counts, ratios_from_counts


@ALLOCATORS.register("uniform")
def uniform(context: AllocationContext, budget: Budget) -> Allocation:
    target = check_budget(budget)
    sizes = context.sizes()
    counts = exact_counts(sizes, {name: target for name in sizes}, target)
    return Allocation(ratios=ratios_from_counts(sizes, counts))
