"""Backends turn a Plan into real weight changes: ``apply_plan`` checks the plan, then dispatches by op."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..calibration import BlockwiseRunner, attach_hessians, block_linears
from ..errors import PlanError
from ..models.discovery import decoder_linears
from ..models.restructure import STRUCTURE_REPLAY  # noqa: F401  (re-exported for the ops)
from ..plan import Action, Plan
from ..registry import Registry


@dataclass
class ApplyContext:
    """What an op may need besides weights: a CalibrationSource (windows and Profile, built lazily)."""

    calibration: Any = None

    def require_calibration(self) -> Any:
        if self.calibration is None:
            raise PlanError("This plan's method needs calibration data, but none was given to apply it.")
        return self.calibration


OpHandler = Callable[[nn.Module, list[Action], ApplyContext], None]
OPS: Registry[OpHandler] = Registry("plan operation")
# op -> (the unit names it may act on in a model, what such a unit is called in error messages)
OP_UNITS: Registry[tuple[Callable[[nn.Module], set[str]], str]] = Registry("plan operation")
OP_UNITS.add("sparsify", (lambda model: set(decoder_linears(model)), "a decoder linear"))
# op -> the registry its actions' ``method`` names (sparsifiers, width importance scorers)
OP_METHODS: dict[str, Registry] = {}


def architecture_signature(model: nn.Module) -> dict[str, Any]:
    """What a plan records about the model it was made for, to reject plans for another model."""
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "num_blocks": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
    }


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """Raise ``PlanError`` when the plan names another architecture, missing units or unknown methods."""
    expected, actual = plan.architecture, architecture_signature(model)
    if not expected:
        raise PlanError("The plan records no architecture, so it cannot be checked against this model.")
    mismatched = [k for k in expected if k in actual and expected[k] != actual[k]]
    if mismatched:
        key = mismatched[0]
        raise PlanError(
            f"The plan was made for a model with {key}={expected[key]}, but this model has {key}={actual[key]}."
        )
    units: dict[str, set[str]] = {}
    for action in plan.actions:
        if action.op not in OPS:
            raise PlanError(f"The plan uses operation '{action.op}', which no op implements.")
        valid, noun = OP_UNITS.get(action.op)
        if action.op not in units:
            units[action.op] = valid(model)
        if action.unit not in units[action.op]:
            raise PlanError(f"The plan names unit '{action.unit}', which is not {noun} in this model.")
        methods = OP_METHODS.get(action.op)
        if methods is not None and action.method not in methods:
            raise PlanError(
                f"The plan uses method '{action.method}' for {action.unit}; known methods: {', '.join(methods.names())}."
            )


def apply_plan(model: nn.Module, plan: Plan, context: ApplyContext | None = None) -> nn.Module:
    """Apply every action of ``plan`` to ``model`` in place (after checking it fits) and return the model."""
    check_plan_fits(model, plan)
    grouped: dict[str, list[Action]] = defaultdict(list)
    for action in plan.actions:
        grouped[action.op].append(action)
    for op, actions in grouped.items():
        OPS.get(op)(model, actions, context or ApplyContext())
    return model


def dispatch_by_method(methods: Registry, model: nn.Module, actions: list[Action], context: ApplyContext) -> None:
    """Hand each method's actions (in plan order) to the function ``methods`` registers for it."""
    by_method: dict[str, list[Action]] = defaultdict(list)
    for action in actions:
        by_method[action.method].append(action)
    for method, group in by_method.items():
        methods.get(method)(model, group, context)


def sequential_pass(model: nn.Module, actions: list[Action], context: ApplyContext, description: str,
                    attach: Callable[[dict[str, nn.Linear]], tuple[dict[str, Any], list]],
                    update: Callable[[nn.Module, Action, Any], None]) -> None:
    """Stream the calibration windows block by block: ``attach`` hooks collecting statistics of every target
    linear's inputs in the block, run it, call ``update(linear, action, statistic)`` for each, then run the
    updated block so the next block sees compressed outputs (Wanda's, SparseGPT's and GPTQ's sequential
    calibration)."""

    source = context.require_calibration()
    targets = {a.unit: a for a in actions}
    runner = BlockwiseRunner(model, source.tokens(), source.settings.calib_batch_size)
    for index in runner.progress(description):
        linears = {n: m for n, m in block_linears(runner, index).items() if n in targets}
        if linears:
            statistics, handles = attach(linears)
            try:
                runner.feed(index, list(linears.values()))
            finally:
                for handle in handles:
                    handle.remove()
            for name, linear in linears.items():
                update(linear, targets[name], statistics.pop(name))
        if index + 1 < len(runner.blocks):
            runner.advance(runner.forward(index))


def sequential_hessian_pass(model: nn.Module, actions: list[Action], context: ApplyContext, description: str,
                            update: Callable[[nn.Module, Action, torch.Tensor], None]) -> None:
    """``sequential_pass`` with each target linear's input Hessian (SparseGPT, GPTQ)."""

    sequential_pass(model, actions, context, description, attach_hessians,
                    lambda linear, action, accumulator: update(linear, action, accumulator.hessian))
