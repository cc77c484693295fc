"""The allocator interface: ``(context, budget) -> Allocation``; allocators never touch weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..config import Budget
from ..errors import BudgetError
from ..registry import Registry


@dataclass
class AllocationContext:
    """What an allocator may read: the model's shapes, its decoder linears and (later) a Profile."""

    model: nn.Module
    linears: dict[str, nn.Linear]
    seed: int = 0
    profile: Any = None


@dataclass
class Allocation:
    """Per-unit ratios plus the parameters used and per-layer details worth reporting."""

    ratios: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


Allocator = Callable[..., Allocation]
ALLOCATORS: Registry[Allocator] = Registry("allocator")


def exact_counts(sizes: dict[str, int], ratios: dict[str, float], target: float) -> dict[str, int]:
    """Integer counts per unit, near ``ratio * size``, summing exactly to ``round(target * total)``.

    Largest-remainder rounding after rescaling, so the parameter-weighted budget is met exactly.
    """
    total = sum(sizes.values())
    wanted = round(target * total)
    raw = {u: ratios[u] * sizes[u] for u in sizes}
    scale = wanted / sum(raw.values()) if sum(raw.values()) > 0 else 0.0
    raw = {u: min(v * scale, sizes[u] - 1) for u, v in raw.items()}
    counts = {u: math.floor(v) for u, v in raw.items()}
    shortfall = wanted - sum(counts.values())
    order = sorted(sizes, key=lambda u: raw[u] - counts[u], reverse=True)
    for unit in order:
        if shortfall <= 0:
            break
        if counts[unit] < sizes[unit] - 1:
            counts[unit] += 1
            shortfall -= 1
    if shortfall != 0:
        raise BudgetError(f"Cannot reach sparsity {target}: the units cannot hold that many zeros.")
    return counts


def ratios_from_counts(sizes: dict[str, int], counts: dict[str, int]) -> dict[str, float]:
    return {u: counts[u] / sizes[u] for u in sizes}


def check_budget(budget: Budget) -> float:
    if not 0.0 <= budget.sparsity < 1.0:
        raise BudgetError(f"Sparsity must lie in [0, 1) (got {budget.sparsity}).")
    return budget.sparsity
