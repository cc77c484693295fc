"""Turning a request (method, allocator, budget, options) into a Plan; allocators never touch weights."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .allocate import ALLOCATORS, DEPTH_ALLOCATORS, AllocationContext, DepthContext, DepthStep
from .backends import SPARSIFIERS, architecture_signature
from .config import Budget, LatencySetting
from .cost import measure_latency_table
from .errors import BudgetError, LayerwiseError
from .models import LoadedModel, decoder_linears, get_adapter
from .plan import Plan, RemoveAction, SparsifyAction, TuneSpec
from .profile import CalibrationSource
from .registry import Registry

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
    _check_params(ALLOCATORS.get(allocator), allocator, params)


def _check_params(function: Any, allocator: str, params: dict[str, Any]) -> None:
    accepted = set(inspect.signature(function).parameters) - {"context", "budget"}
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
                     allocator_params: dict[str, Any], structure: str = "unstructured") -> tuple[str, str, str | None]:
    """Check names, options and N:M before any model is loaded: canonical (method, allocator, pattern)."""
    STRUCTURES.canonical(structure)
    if structure == "depth":
        return "remove", _check_depth_request(allocator, budget, nm, allocator_params), None
    if budget.sparsity is None:
        raise BudgetError("Unstructured pruning needs --sparsity.")
    method, allocator = resolve_method(method, allocator)
    _check_allocator_params(allocator, allocator_params)
    return method, allocator, parse_nm(nm, budget, allocator)


def _check_depth_request(allocator: str, budget: Budget, nm: str | None, params: dict[str, Any]) -> str:
    if allocator == "uniform":  # the CLI's default allocator means "not chosen"
        raise LayerwiseError("Depth pruning needs an allocator: --allocator sprint, sleb, shortgpt or drop-last.")
    allocator = DEPTH_ALLOCATORS.canonical(allocator)
    if budget.target_speedup is None and budget.remove_sublayers is None:
        raise BudgetError("Depth pruning needs --target-speedup or --num-remove-sublayers.")
    if nm is not None:
        raise BudgetError("--nm applies to unstructured sparsity, not to depth pruning.")
    _check_params(DEPTH_ALLOCATORS.get(allocator), allocator, params)
    return allocator


def make_plan(
    loaded: LoadedModel,
    budget: Budget,
    method: str = "magnitude",
    allocator: str = "uniform",
    seed: int = 0,
    calibration: CalibrationSource | None = None,
    nm: str | None = None,
    structure: str = "unstructured",
    on_step: Callable[[DepthStep, list[str]], None] | None = None,
    **allocator_params: Any,
) -> Plan:
    """Ask the named allocator for a plan under ``budget``: per-unit sparsities, or sublayers to remove."""
    method, allocator, pattern = validate_request(method, allocator, budget, nm, allocator_params, structure)
    request = PlanRequest(loaded, budget, method, allocator, seed, calibration, pattern, on_step, allocator_params)
    return STRUCTURES.get(structure)(request)


@dataclass
class PlanRequest:
    loaded: LoadedModel
    budget: Budget
    method: str
    allocator: str
    seed: int
    calibration: CalibrationSource | None
    pattern: str | None
    on_step: Callable[[DepthStep, list[str]], None] | None
    params: dict[str, Any]

    def plan(self, actions: list, params: dict[str, Any], details: dict[str, Any],
             prediction: dict[str, Any] | None = None) -> Plan:
        return Plan(
            model=self.loaded.spec,
            architecture=architecture_signature(self.loaded.model),
            budget=self.budget,
            allocator=self.allocator,
            method=self.method,
            allocator_params={**params, **self.params},
            seed=self.seed,
            actions=actions,
            prediction=prediction or {},
            details=details,
        )


STRUCTURES: Registry[Callable[[PlanRequest], Plan]] = Registry("structure")


@STRUCTURES.register("unstructured")
def _sparsity_plan(request: PlanRequest) -> Plan:
    linears = decoder_linears(request.loaded.model)
    context = AllocationContext(model=request.loaded.model, linears=linears, seed=request.seed,
                                calibration=request.calibration)
    allocation = ALLOCATORS.get(request.allocator)(context, request.budget, **request.params)
    sparsity = request.budget.sparsity
    ratios = {u: sparsity for u in allocation.ratios} if request.pattern else allocation.ratios
    actions = [SparsifyAction(unit=u, ratio=r, method=request.method, pattern=request.pattern)
               for u, r in ratios.items()]
    return request.plan(actions, allocation.params, allocation.details)


@STRUCTURES.register("depth")
def _depth_plan(request: PlanRequest) -> Plan:
    """Measure the latency table in the run's deployment setting, search, and list the removals in order."""
    model = request.loaded.model
    settings = request.calibration.settings if request.calibration is not None else None
    setting = (settings.latency if settings is not None else None) or LatencySetting()
    table = measure_latency_table(model, setting)
    context = DepthContext(model=model, latency=table, calibration=request.calibration, seed=request.seed,
                           batch_size=settings.calib_batch_size if settings else 8, on_step=request.on_step)
    allocation = DEPTH_ALLOCATORS.get(request.allocator)(context, request.budget, **request.params)
    tuning = allocation.tuning
    actions = [RemoveAction(unit=name, tune=TuneSpec(**tuning[name]) if name in tuning else None)
               for name in allocation.removed]
    kinds = [get_adapter(model).sublayer(name).kind for name in allocation.removed]
    prediction = {"speedup": round(table.predicted_speedup(kinds), 4), "latency_table": table.model_dump()}
    details = {**allocation.details, "search_s": allocation.seconds,
               "steps": [asdict(step) for step in allocation.steps]}
    return request.plan(actions, allocation.params, details, prediction)
