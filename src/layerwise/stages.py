"""Recipes with stages, the way llm-compressor composes modifiers: prune (width, depth or joint) → heal →
quantize (GGUF types) → export, run end to end by ``layerwise compress --recipe``. Every stage's options are
checked before the model loads; the saved plan holds every stage's actions in the order they were applied, so
the model reloads. A joint prune stage plans widths, removals and GGUF types together (for a llama.cpp decode
speed, types change speed); before a heal stage its types wait until healing is done, unless a quantize stage
allocates them anew."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .calibration import CalibrationSource
from .config import Budget, HealSetting, RunSettings
from .errors import SettingsError
from .healing import heal_measured
from .measure import Timings
from .models import LoadedModel
from .ops import ApplyContext, apply_plan
from .ops.quantize import QuantizeAction
from .options import RECIPE_FORMAT, PlanOptions, read_recipe_file
from .plan import Plan
from .planning import make_plan, validate_request

PRUNE_STRUCTURES = ("width", "depth", "joint", "unstructured")
STAGE_KINDS = ("prune", "heal", "quantize")


@dataclass
class Stage:
    """One stage: its kind and its options (planning options for prune/quantize, a HealSetting for heal)."""

    kind: str
    options: Any


@dataclass
class StagedRecipe:
    """An ordered list of stages and the export format (None: no export)."""

    stages: list[Stage]
    export: Optional[str]
    source: str

    @classmethod
    def read(cls, path: str | Path) -> Optional["StagedRecipe"]:
        """The staged recipe in ``path``, or None when the file is a one-stage recipe (options at top level)."""
        file, data = read_recipe_file(path)
        if not isinstance(data, dict) or "stages" not in data:
            return None
        return cls.parse(data, f"Recipe file {file}")

    @classmethod
    def parse(cls, data: dict[str, Any], origin: str) -> "StagedRecipe":
        """Check the stage list: known kinds, each stage's options, and the order prune → heal → quantize."""
        extra = sorted(set(data) - {"format", "stages", "export"})
        if extra:
            raise SettingsError(f"{origin} has '{extra[0]}' beside its stages; a staged recipe holds format, "
                                "stages and export, and each stage its own options.")
        if data.get("format", RECIPE_FORMAT) != RECIPE_FORMAT:
            raise SettingsError(f"{origin} has format '{data['format']}'; this version reads {RECIPE_FORMAT}.")
        entries = data["stages"]
        if not isinstance(entries, list) or not entries:
            raise SettingsError(f"{origin}: stages must be a non-empty list, e.g. [prune: {{...}}, heal: {{...}}].")
        stages = [_stage(entry, index, origin) for index, entry in enumerate(entries, start=1)]
        order = [STAGE_KINDS.index(stage.kind) for stage in stages]
        if order != sorted(order) or any(order.count(k) > 1 for k in (1, 2)):
            raise SettingsError(f"{origin}: stages run in the order prune → heal → quantize, heal and quantize at "
                                f"most once each (got {' → '.join(s.kind for s in stages)}).")
        if stages[0].kind == "heal":
            raise SettingsError(f"{origin}: a heal stage needs a prune stage before it.")
        export = data.get("export")
        if export not in (None, "gguf"):
            raise SettingsError(f"{origin}: export must be gguf (got '{export}').")
        return cls(stages, export, origin)

    @property
    def healing(self) -> Optional[HealSetting]:
        return next((stage.options for stage in self.stages if stage.kind == "heal"), None)

    def run(self, loaded: LoadedModel, teacher: Optional[nn.Module], settings: RunSettings, out: str | Path,
            resume: bool, timings: Timings) -> tuple[Plan, Optional[dict[str, Any]]]:
        """Run the stages on ``loaded`` in place: the combined plan and the healing record (None without heal)."""
        plans: list[Plan] = []
        healing = None
        deferred: Optional[Plan] = None  # a joint prune stage's GGUF types, applied once healing is done
        for stage in self.stages:
            if stage.kind == "heal":
                healing = heal_measured(loaded, teacher, stage.options, settings, timings, out, resume)
                continue
            if stage.kind == "quantize":
                deferred = None  # the quantize stage allocates the types itself, on the healed weights
            options: PlanOptions = stage.options
            calibration = CalibrationSource(loaded, settings.model_copy(update=options.calibration()))
            plan = make_plan(loaded, options.budget(), options.method, options.chosen_allocator, settings.seed,
                             calibration, options.nm, options.chosen_structure, **options.allocator_params())
            if stage.kind == "prune" and self.healing is not None:
                plan, deferred = split_types(plan)
            apply_plan(loaded.model, plan, ApplyContext(calibration))
            plans.append(plan)
        if deferred is not None:
            apply_plan(loaded.model, deferred, ApplyContext(CalibrationSource(loaded, settings)))
            plans.append(deferred)
        return combine_plans(plans), healing


def _stage(entry: Any, index: int, origin: str) -> Stage:
    if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in STAGE_KINDS:
        raise SettingsError(f"{origin}: stage {index} must be one of {', '.join(STAGE_KINDS)} with its options, "
                            "e.g. 'prune: {structure: width, pruning_ratio: 0.3}'.")
    kind, values = next(iter(entry.items()))
    values = {str(k).replace("-", "_"): v for k, v in (values or {}).items()}
    where = f"{origin}, stage {index} ({kind})"
    if kind == "heal":
        try:
            return Stage(kind, HealSetting(**values))
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": ("?",), "msg": str(exc)}
            raise SettingsError(f"{where}: invalid {first['loc'][0]}: {first['msg']}.") from None
    if kind == "quantize":
        values.setdefault("structure", "quant")
    options = PlanOptions.parse(values, where)
    allowed = ("quant",) if kind == "quantize" else PRUNE_STRUCTURES
    if options.chosen_structure not in allowed:
        raise SettingsError(f"{where}: structure '{options.chosen_structure}' does not belong in a {kind} stage "
                            f"(use {', '.join(allowed)}).")
    validate_request(options.method, options.chosen_allocator, options.budget(), options.nm,
                     options.allocator_params(), options.chosen_structure)
    return Stage(kind, options)


def split_types(plan: Plan) -> tuple[Plan, Optional[Plan]]:
    """A prune plan that also chose storage types (the joint search) as its structure now and its quantization
    later: healing trains float weights, so the types are applied after it (None: the plan chose none)."""
    quantized = [a for a in plan.actions if isinstance(a, QuantizeAction)]
    if not quantized:
        return plan, None
    structure = [a for a in plan.actions if not isinstance(a, QuantizeAction)]
    return plan.model_copy(update={"actions": structure}), plan.model_copy(update={"actions": quantized})


def combine_plans(plans: list[Plan]) -> Plan:
    """One plan for stages applied in order: their actions in order, their budgets together, and each stage's
    prediction and details merged (later stages' keys win) beside a per-stage list."""
    first = plans[0]
    if len(plans) == 1:
        return first
    budget: dict[str, Any] = {}
    prediction: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for plan in plans:
        budget.update(plan.budget.model_dump(exclude_none=True))
        prediction.update(plan.prediction)
        details.update(plan.details)
    details["stages"] = [{"allocator": p.allocator, "method": p.method, "budget": p.budget.model_dump(exclude_none=True),
                          "actions": len(p.actions)} for p in plans]
    return first.model_copy(update={
        "budget": Budget(**budget), "allocator": "+".join(p.allocator for p in plans),
        "method": "+".join(p.method for p in plans), "actions": [a for p in plans for a in p.actions],
        "allocator_params": {k: v for p in plans for k, v in p.allocator_params.items()},
        "prediction": prediction, "details": details})
