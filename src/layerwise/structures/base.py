"""``Structure``: one kind of plan (sparsity, removal, width, bits) in one class, registered by name.

A structure owns its budget, its own options and their validation, the calibration it defaults to, how it
turns an allocation into plan actions, and the metrics its runs add to result.json; adding a structure is
one module that subclasses ``Structure`` and registers itself in ``STRUCTURES``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..calibration import CalibrationSource
from ..component_options import ComponentOptions, option  # noqa: F401  (option: for the structures)
from ..config import Budget
from ..errors import BudgetError, LayerwiseError
from ..models import LoadedModel, model_fingerprint
from ..ops import architecture_signature
from ..plan import Plan
from ..registry import Registry

if TYPE_CHECKING:
    from ..options import PlanOptions


class StructureOptions(ComponentOptions):
    """A structure's own options and its budget's; its allocators declare theirs (``declares``)."""


@dataclass
class PlanRequest:
    """A validated request: the model, budget, canonical method and allocator, calibration and options."""

    loaded: LoadedModel
    budget: Budget
    method: str
    allocator: str
    seed: int
    calibration: CalibrationSource | None
    pattern: str | None
    on_step: Callable[..., None] | None
    params: dict[str, Any]

    def plan(self, actions: list, params: dict[str, Any], details: dict[str, Any],
             prediction: dict[str, Any] | None = None) -> Plan:
        return Plan(
            model=self.loaded.spec,
            architecture=architecture_signature(self.loaded.model),
            weights=model_fingerprint(self.loaded.model),
            budget=self.budget,
            allocator=self.allocator,
            method=self.method,
            allocator_params={**params, **self.params},
            seed=self.seed,
            actions=actions,
            calibration=self.calibration.record() if self.calibration is not None else None,
            prediction=prediction or {},
            details=details,
        )


class Structure:
    """Base class of the registered structures; subclasses set ``name`` and override what they need."""

    name: ClassVar[str]
    options: ClassVar[type[StructureOptions]] = StructureOptions  # its budget's and its own
    allocators: ClassVar[Registry | None] = None  # its allocators, each with the options it ``declares``
    calibration_defaults: ClassVar[dict[str, int]] = {}  # calibration when the user names none
    records_milestones: ClassVar[bool] = False  # the search reports steps that compress may evaluate
    needs_adapter: ClassVar[bool] = False  # changes shapes or removes modules: the family needs a model adapter

    def budget(self, options: "PlanOptions") -> Budget:
        """The budget from the planning options, each value validated in one sentence."""
        raise NotImplementedError

    def validate(self, method: str | None, allocator: str, budget: Budget, nm: str | None,
                 params: dict[str, Any]) -> tuple[str, str, str | None]:
        """Check names and options before any model loads: canonical (method, allocator, N:M pattern)."""
        raise NotImplementedError

    def check_model(self, model: Any, allocator: str, budget: Budget, params: dict[str, Any], deploy: bool) -> None:
        """Refuse, right after the model loads and before any calibration, what its family and the options alone
        rule out (a search step its layout defeats; with ``deploy``, a structure the GGUF export cannot express)."""

    def plan(self, request: PlanRequest) -> Plan:
        """Ask the allocator and turn its answer into plan actions (weights untouched)."""
        raise NotImplementedError

    def stage_budget(self, budget: Budget, stage: int, stages: int) -> Budget:
        """The budget of stage ``stage`` (1-based) of ``stages`` when pruning is interleaved with healing
        (Adapt-Accel), measured against the model as the earlier stages left it."""
        raise BudgetError(f"--iterative-steps applies to width and depth pruning, not to {self.name}.")

    def compose(self, plans: list[Plan], model: Any) -> Plan:
        """One plan equal to applying ``plans`` in order to the original model (what a saved model replays);
        ``model`` is the model after the last stage."""
        raise BudgetError(f"--iterative-steps applies to width and depth pruning, not to {self.name}.")

    def metrics(self, plan: Plan, loaded: LoadedModel, dense_latency: dict | None,
                extra: dict[str, Any]) -> dict[str, Any]:
        """What a run of a plan with this structure's actions adds to result.json's metrics ({} otherwise)."""
        return {}

    def table_rows(self, record: dict[str, Any]) -> list[tuple[str, str, str]]:
        """Rows (label, dense, compressed) this structure adds to the command line's result table."""
        return []

    def own(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split ``params`` into (the structure's own options: its options model's fields, budgets aside; the
        allocator's)."""
        names = {name for name, field in self.options.model_fields.items()
                 if not (field.json_schema_extra or {}).get("budget")}
        return ({k: v for k, v in params.items() if k in names}, {k: v for k, v in params.items() if k not in names})


STRUCTURES: Registry[Structure] = Registry("structure")


def register(cls: type[Structure]) -> type[Structure]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    STRUCTURES.add(cls.name, cls())
    return cls


# parameter name -> the CLI flag that sets it, where they differ (the command line's options register theirs)
PARAMETER_FLAGS: dict[str, str] = {}


def check_params(function: Any, allocator: str, params: dict[str, Any]) -> None:
    """Refuse options ``function`` (an allocator) does not take, naming them as CLI flags."""
    accepted = set(inspect.signature(function).parameters) - {"context", "budget"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        options = ", ".join(PARAMETER_FLAGS.get(k, "--" + k.replace("_", "-")) for k in unknown)
        raise LayerwiseError(f"Allocator '{allocator}' does not take {options}.")
