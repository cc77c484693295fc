"""Turning a request (method, allocator, budget, options) into a Plan; allocators never touch weights."""

from __future__ import annotations

import inspect
from typing import Any

from .allocate import ALLOCATORS, AllocationContext
from .backends import SPARSIFIERS, architecture_signature
from .config import Budget
from .errors import BudgetError, LayerwiseError
from .models import LoadedModel, decoder_linears
from .plan import Plan, SparsifyAction
from .profile import CalibrationSource

# The AlphaPruning repository's method names: the backend with the ``alpha`` allocator.
METHOD_ALIASES = {"magnitude_ww": ("magnitude", "alpha"), "wanda_ww": ("wanda", "alpha"),
                  "sparsegpt_ww": ("sparsegpt", "alpha")}


def resolve_method(method: str, allocator: str) -> tuple[str, str]:
    """Canonical (method, allocator), expanding the ``*_ww`` aliases; unknown names raise."""
    if method in METHOD_ALIASES:
        method, implied = METHOD_ALIASES[method]
        if allocator not in ("uniform", implied):
            raise LayerwiseError(f"Method alias selects the {implied} allocator; it cannot be combined with '{allocator}'.")
        allocator = implied
    return SPARSIFIERS.canonical(method), ALLOCATORS.canonical(allocator)


def _check_allocator_params(allocator: str, params: dict[str, Any]) -> None:
    accepted = set(inspect.signature(ALLOCATORS.get(allocator)).parameters) - {"context", "budget"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        options = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise LayerwiseError(f"Allocator '{allocator}' does not take {options}.")


def parse_nm(pattern: str | None, budget: Budget, allocator: str) -> str | None:
    """Validate an N:M pattern: it fixes every matrix at N/M, so it needs the uniform allocator and that budget."""
    if pattern is None:
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise BudgetError(f"N:M pattern must look like 2:4 (got '{pattern}').") from None
    if not 0 < n < m:
        raise BudgetError(f"N:M pattern needs 0 < N < M (got {pattern}).")
    if allocator != "uniform":
        raise BudgetError(f"An N:M pattern fixes every matrix at {n}/{m}; use it with --allocator uniform.")
    if abs(budget.sparsity - n / m) > 1e-9:
        raise BudgetError(f"--nm {pattern} means sparsity {n / m:g}; got --sparsity {budget.sparsity:g}.")
    return pattern


def validate_request(method: str, allocator: str, budget: Budget, nm: str | None,
                     allocator_params: dict[str, Any]) -> tuple[str, str, str | None]:
    """Check names, options and N:M before any model is loaded: canonical (method, allocator, pattern)."""
    method, allocator = resolve_method(method, allocator)
    _check_allocator_params(allocator, allocator_params)
    return method, allocator, parse_nm(nm, budget, allocator)


def make_plan(
    loaded: LoadedModel,
    budget: Budget,
    method: str = "magnitude",
    allocator: str = "uniform",
    seed: int = 0,
    calibration: CalibrationSource | None = None,
    nm: str | None = None,
    **allocator_params: Any,
) -> Plan:
    """Ask the named allocator for per-unit ratios under ``budget`` and wrap them as a Plan."""
    method, allocator, pattern = validate_request(method, allocator, budget, nm, allocator_params)
    linears = decoder_linears(loaded.model)
    context = AllocationContext(model=loaded.model, linears=linears, seed=seed, calibration=calibration)
    allocation = ALLOCATORS.get(allocator)(context, budget, **allocator_params)
    ratios = {u: budget.sparsity for u in allocation.ratios} if pattern else allocation.ratios
    actions = [SparsifyAction(unit=u, ratio=r, method=method, pattern=pattern) for u, r in ratios.items()]
    return Plan(
        model=loaded.spec,
        architecture=architecture_signature(loaded.model),
        budget=budget,
        allocator=allocator,
        method=method,
        allocator_params={**allocation.params, **allocator_params},
        seed=seed,
        actions=actions,
        details=allocation.details,
    )
