"""Depth: remove whole attention or MLP sublayers (SPRINT and its baselines) to a predicted speedup."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Optional

from ..allocate import DEPTH_ALLOCATORS, DepthContext
from ..config import Budget, LatencySetting
from ..errors import BudgetError, LayerwiseError
from ..export import check_structure_exportable
from ..formatting import fmt
from ..measure import measured_speedup
from ..models import LoadedModel, get_adapter
from ..ops import remove_sublayers
from ..ops.depth import RemoveAction, TuneSpec
from ..ops.tuning import check_tunable
from ..plan import Plan
from .base import PlanRequest, Structure, StructureOptions, check_params, option, register
from .latency_probes import measure_latency_table
from .speed_guard import guard_speed, speedup_of

if TYPE_CHECKING:
    from ..options import PlanOptions


class DepthOptions(StructureOptions):
    """Depth pruning: the budget, a predicted speedup or a count (SPRINT's and SLEB's options: their allocators)."""

    target_speedup: Optional[float] = option("depth: remove sublayers until this predicted speedup; joint: at "
                                             "least this predicted speedup.", budget=True)
    num_remove_sublayers: Optional[int] = option("depth: remove exactly this many sublayers.", budget=True)
    speed_guard: Optional[bool] = option("depth, joint: measure the chosen plan's speedup as results are measured "
                                         "and, when it falls short of --target-speedup, raise the predicted budget "
                                         "by the error and plan again, up to 3 measurements (default on).",
                                         "--speed-guard/--no-speed-guard")


@register
class Depth(Structure):
    name = "depth"
    needs_adapter = True
    options = DepthOptions
    allocators = DEPTH_ALLOCATORS
    # SPRINT's and SLEB's searches cost a forward pass per candidate and step, so the 128 x 512 default of the
    # one-pass methods would run for hours on a CPU (the depth table uses 8 x 256: 4-10 minutes per method)
    calibration_defaults = {"nsamples": 8, "calib_seqlen": 256}
    records_milestones = True

    def budget(self, options: "PlanOptions") -> Budget:
        return Budget.for_depth(options.target_speedup, options.num_remove_sublayers)

    def check_model(self, model: Any, allocator: str, budget: Budget, params: dict[str, Any], deploy: bool) -> None:

        if allocator == "sprint" and (params.get("num_candidate_sublayers") is None
                                      or params["num_candidate_sublayers"] > 0):
            check_tunable(get_adapter(model))
        if deploy:
            check_structure_exportable(model, removes=True)

    def validate(self, method: str | None, allocator: str, budget: Budget, nm: str | None,
                 params: dict[str, Any]) -> tuple[str, str, str | None]:
        if allocator == "uniform":  # the CLI's default allocator means "not chosen"
            raise LayerwiseError("Depth pruning needs an allocator: --allocator sprint, sleb, shortgpt or drop-last.")
        allocator = DEPTH_ALLOCATORS.canonical(allocator)
        if budget.target_speedup is None and budget.remove_sublayers is None:
            raise BudgetError("Depth pruning needs --target-speedup or --num-remove-sublayers.")
        if nm is not None:
            raise BudgetError("--nm applies to unstructured sparsity, not to depth pruning.")
        check_params(DEPTH_ALLOCATORS.get(allocator), allocator, self.own(params)[1])
        return "remove", allocator, None

    def plan(self, request: PlanRequest) -> Plan:
        """Measure the latency table in the run's deployment setting, search, and list the removals in order."""
        model = request.loaded.model
        settings = request.calibration.settings if request.calibration is not None else None
        setting = (settings.latency if settings is not None else None) or LatencySetting()
        engine = (settings.latency_engine if settings is not None else None) or "pytorch"
        options, params = self.own(request.params)
        table = measure_latency_table(request.loaded, setting, engine)
        context = DepthContext(model=model, latency=table, calibration=request.calibration, seed=request.seed,
                               batch_size=settings.calib_batch_size if settings else 8, on_step=request.on_step)
        allocate = DEPTH_ALLOCATORS.get(request.allocator)
        allocation = allocate(context, request.budget, **params)
        guard: list[dict[str, float]] = []
        if request.budget.target_speedup is not None and options.get("speed_guard", True):
            def kinds_of(removed: list[str]) -> list[str]:
                return [get_adapter(model).sublayer(name).kind for name in removed]

            def replan(_, budget: float):
                try:
                    return allocate(context, Budget.for_depth(target_speedup=budget), **params)
                except BudgetError:  # nothing left to remove for the raised budget
                    return None

            allocation, guard = guard_speed(
                request.budget.target_speedup, allocation,
                lambda found: speedup_of(request.loaded, lambda trial: remove_sublayers(trial, found.removed),
                                         setting, engine),
                lambda found: table.predicted_speedup(kinds_of(found.removed)), replan)
        tuning = allocation.tuning
        actions = [RemoveAction(unit=name, tune=TuneSpec(**tuning[name]) if name in tuning else None)
                   for name in allocation.removed]
        kinds = [get_adapter(model).sublayer(name).kind for name in allocation.removed]
        prediction = {"speedup": round(table.predicted_speedup(kinds), 4), "latency_table": table.model_dump()}
        details = {**allocation.details, "search_s": allocation.seconds,
                   "steps": [asdict(step) for step in allocation.steps], "speed_guard": guard}
        return request.plan(actions, {**allocation.params, **options}, details, prediction)

    def stage_budget(self, budget: Budget, stage: int, stages: int) -> Budget:
        """An equal share per stage: the K-th root of the target speedup (each stage's latency table is timed
        on the model the earlier stages left, so the stages' speedups multiply), or of the removal count."""
        if budget.target_speedup is not None:
            return Budget.for_depth(target_speedup=budget.target_speedup ** (1.0 / stages))
        count = budget.remove_sublayers * stage // stages - budget.remove_sublayers * (stage - 1) // stages
        if count < 1:
            raise BudgetError(f"--num-remove-sublayers {budget.remove_sublayers} cannot be split into "
                              f"{stages} stages of at least one removal each.")
        return Budget.for_depth(remove_sublayers=count)

    def compose(self, plans: list[Plan], model: Any) -> Plan:
        """The stages' removals in order (sublayer names do not change when others go); the predicted speedup
        is the product of the stages' predictions."""
        speedup = 1.0
        for plan in plans:
            speedup *= plan.prediction.get("speedup") or 1.0
        first = plans[0]
        details = {"search_s": round(sum(p.details.get("search_s") or 0.0 for p in plans), 3),
                   "steps": [step for p in plans for step in p.details.get("steps", [])],
                   "stages": [{"budget": p.budget.model_dump(exclude_none=True), "removed": len(p.actions),
                               "predicted_speedup": p.prediction.get("speedup")} for p in plans]}
        return first.model_copy(update={"actions": [a for p in plans for a in p.actions],
                                        "prediction": {"speedup": round(speedup, 4)}, "details": details})

    def metrics(self, plan: Plan, loaded: LoadedModel, dense_latency: dict | None,
                extra: dict[str, Any]) -> dict[str, Any]:
        """The removals in order, the predicted speedup and the intermediate points evaluated on the way."""
        removed = [action.unit for action in plan.actions if action.op == "remove"]
        if not removed:
            return {}
        milestones = extra.get("milestones") or []
        for record in milestones:
            record["speedup"] = measured_speedup(dense_latency, record["latency"])
        return {"removed_sublayers": removed, "predicted_speedup": plan.prediction.get("speedup"),
                "milestones": milestones}

    def table_rows(self, record: dict[str, Any]) -> list[tuple[str, str, str]]:
        metrics = record["metrics"]
        if not metrics.get("removed_sublayers"):
            return []
        speedup = metrics.get("speedup") or {}
        return [("sublayers removed", "", str(len(metrics["removed_sublayers"]))),
                ("speedup predicted / measured", "",
                 f"{fmt(metrics['predicted_speedup'], '.2f')}x / {fmt(speedup.get('total'), '.2f')}x"),
                ("pruning search time", "", f"{metrics['pruning_s']:.1f} s")]
