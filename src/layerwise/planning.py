"""Turning a request (structure, method, allocator, budget, options) into a Plan; allocators never touch weights.

Each structure (``structures/``) validates its own request and builds its own plan; this module only routes.
"""

from __future__ import annotations

from typing import Any, Callable

from .calibration import CalibrationSource
from .config import Budget
from .models import LoadedModel
from .plan import Plan
from .structures import STRUCTURES, PlanRequest


def validate_request(method: str | None, allocator: str, budget: Budget, nm: str | None,
                     allocator_params: dict[str, Any], structure: str = "unstructured") -> tuple[str, str, str | None]:
    """Check names, options and N:M before any model is loaded: canonical (method, allocator, pattern)."""
    return STRUCTURES.get(structure).validate(method, allocator, budget, nm, allocator_params)


def make_plan(
    loaded: LoadedModel,
    budget: Budget,
    method: str | None = None,
    allocator: str = "uniform",
    seed: int = 0,
    calibration: CalibrationSource | None = None,
    nm: str | None = None,
    structure: str = "unstructured",
    on_step: Callable[..., None] | None = None,
    **allocator_params: Any,
) -> Plan:
    """Ask the named allocator for a plan under ``budget``: per-unit sparsities, removals, widths or bits."""
    method, allocator, pattern = validate_request(method, allocator, budget, nm, allocator_params, structure)
    request = PlanRequest(loaded, budget, method, allocator, seed, calibration, pattern, on_step, allocator_params)
    return STRUCTURES.get(structure).plan(request)
