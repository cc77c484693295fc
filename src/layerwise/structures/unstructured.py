"""Unstructured (and N:M) sparsity: a sparsity per decoder linear, masks chosen by a sparsifier backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ..allocate import ALLOCATORS, AllocationContext
from ..config import Budget
from ..errors import BudgetError, LayerwiseError
from ..models import decoder_linears
from ..ops import SPARSIFIERS
from ..ops.unstructured import SparsifyAction
from ..plan import Plan
from .base import PlanRequest, Structure, StructureOptions, check_params, option, register

if TYPE_CHECKING:
    from ..options import PlanOptions

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


class UnstructuredOptions(StructureOptions):
    """Unstructured sparsity: the budget and N:M (owl's and alpha's options: their allocators)."""

    sparsity: Optional[float] = option("Target mean sparsity over decoder linears, in [0, 1) (default 0.5).", budget=True)
    nm: Optional[str] = option("Semi-structured N:M pattern, e.g. 2:4 (uniform, sparsity N/M).", budget=True)


@register
class Unstructured(Structure):
    name = "unstructured"
    options = UnstructuredOptions
    allocators = ALLOCATORS

    def budget(self, options: "PlanOptions") -> Budget:
        return Budget.for_sparsity(0.5 if options.sparsity is None else options.sparsity)

    def validate(self, method: str | None, allocator: str, budget: Budget, nm: str | None,
                 params: dict[str, Any]) -> tuple[str, str, str | None]:
        if budget.sparsity is None:
            raise BudgetError("Unstructured pruning needs --sparsity.")
        method, allocator = resolve_method(method or "magnitude", allocator)
        check_params(ALLOCATORS.get(allocator), allocator, params)
        return method, allocator, parse_nm(nm, budget, allocator)

    def plan(self, request: PlanRequest) -> Plan:
        linears = decoder_linears(request.loaded.model)
        context = AllocationContext(model=request.loaded.model, linears=linears, seed=request.seed,
                                    calibration=request.calibration)
        allocation = ALLOCATORS.get(request.allocator)(context, request.budget, **request.params)
        sparsity = request.budget.sparsity
        ratios = {u: sparsity for u in allocation.ratios} if request.pattern else allocation.ratios
        actions = [SparsifyAction(unit=u, ratio=r, method=request.method, pattern=request.pattern)
                   for u, r in ratios.items()]
        return request.plan(actions, allocation.params, allocation.details)
