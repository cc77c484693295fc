"""The allocator interface: ``(context, budget) -> Allocation``; allocators never touch weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..config import Budget
from ..errors import BudgetError, LayerwiseError
from ..models.discovery import block_index, find_blocks
from ..registry import Registry


@dataclass
class AllocationContext:
    """What an allocator may read: the model's shapes, its decoder linears and the calibration Profile."""

    model: nn.Module
    linears: dict[str, nn.Linear]
    seed: int = 0
    calibration: Any = None  # a CalibrationSource, when the run has calibration data

    def require_profile(self) -> Any:
        if self.calibration is None:
            raise LayerwiseError("This allocator needs calibration data, but the run has none.")
        return self.calibration.profile()

    def units_by_block(self) -> dict[int, list[str]]:
        """Unit names grouped by decoder block, in order."""
        prefix, _ = find_blocks(self.model)
        groups: dict[int, list[str]] = {}
        for name in self.linears:
            groups.setdefault(block_index(name, prefix), []).append(name)
        return groups

    def sizes(self) -> dict[str, int]:
        return {name: linear.weight.numel() for name, linear in self.linears.items()}


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


def linear_map(scores: dict[int, float], low: float, high: float) -> dict[int, float]:
    """Rescale scores to [0, 1] and map them linearly onto [low, high] (all ``low`` when scores are flat)."""
    lo, hi = min(scores.values()), max(scores.values())
    span = hi - lo
    return {k: low + (high - low) * ((v - lo) / span if span > 0 else 0.0) for k, v in scores.items()}


def check_budget(budget: Budget) -> float:
    """The budget's sparsity; sparsity allocators need one."""
    if budget.sparsity is None:
        raise BudgetError("This allocator distributes a sparsity budget; pass --sparsity.")
    if not 0.0 <= budget.sparsity < 1.0:
        raise BudgetError(f"Sparsity must lie in [0, 1) (got {budget.sparsity}).")
    return budget.sparsity


def per_block_to_units(context: AllocationContext, block_ratios: dict[int, float], target: float,
                       allocator: str) -> dict[str, float]:
    """Spread per-block ratios to their units and round so the parameter-weighted budget holds exactly."""
    ratios = {u: block_ratios[b] for b, units in context.units_by_block().items() for u in units}
    worst = max(ratios.values())
    if worst >= 1.0 or min(ratios.values()) < 0.0:
        raise BudgetError(
            f"The {allocator} allocation at sparsity {target} needs a layer at sparsity {worst:.3f}, outside [0, 1); "
            "use a smaller range parameter or budget."
        )
    sizes = context.sizes()
    return ratios_from_counts(sizes, exact_counts(sizes, ratios, target))
