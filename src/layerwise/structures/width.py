"""Width: slice whole KV groups and FFN channels per layer (RL-Allocator, RL-Refine and heuristics)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Optional

from ..allocate import WIDTH_ALLOCATORS, WidthContext, WidthSpace
from ..allocate.rl_training import RL_ALGORITHMS
from ..calibration import CalibrationSource
from ..calibration.width import WIDTH_SCORERS
from ..config import Budget, LatencySetting, RunSettings
from ..cost.analytic import CostReport, ModelDims, estimate_costs, predicted_speedups
from ..errors import BudgetError
from ..export import check_structure_exportable
from ..formatting import fmt, fmt_bytes
from ..models import LoadedModel, get_adapter
from ..ops.structured import SliceAction
from ..plan import Plan
from .base import PlanRequest, Structure, StructureOptions, check_params, option, register
from .latency_probes import measure_width_latency_table

if TYPE_CHECKING:
    from ..options import PlanOptions

LAYER_RANGE = re.compile(r"^(\d*):(\d*)$")


def layer_range(text: str | None, blocks: int, option: str) -> range:
    """``start:end`` (either may be empty) as a range of block indices, checked against the model."""
    if text is None:
        return range(blocks)
    start, end = LAYER_RANGE.match(text).groups()
    chosen = range(int(start or 0), int(end) if end else blocks)
    if chosen.start >= chosen.stop or chosen.stop > blocks:
        raise BudgetError(f"{option} {text} does not select layers of this {blocks}-block model.")
    return chosen


class WidthOptions(StructureOptions):
    """Width pruning: the budget, which layers, rounding and importance (the RL options: their allocators)."""

    pruning_ratio: Optional[float] = option("width: fraction of the eligible attention/MLP parameters removed.", budget=True)
    attn_layers: Optional[str] = option("width: attention layers that may be pruned, start:end (default all).")
    mlp_layers: Optional[str] = option("width: MLP layers that may be pruned, start:end (default all).")
    channel_multiple: Optional[int] = option("width: FFN widths move in multiples of this (default 8).")
    taylor_seq_len: Optional[int] = option("width/taylor: calibration sequence length (default 64).")


@register
class Width(Structure):
    name = "width"
    needs_adapter = True
    options = WidthOptions
    allocators = WIDTH_ALLOCATORS

    def budget(self, options: "PlanOptions") -> Budget:
        return Budget.for_width(options.pruning_ratio)

    def check_model(self, model: Any, allocator: str, budget: Budget, params: dict[str, Any], deploy: bool) -> None:

        if deploy:
            blocks = get_adapter(model).num_blocks
            attention = layer_range(params.get("attn_layers"), blocks, "--attn-layers")
            check_structure_exportable(model, per_layer=allocator != "uniform",
                                       narrows_attention=attention is None or len(attention) > 0)

    def validate(self, method: str | None, allocator: str, budget: Budget, nm: str | None,
                 params: dict[str, Any]) -> tuple[str, str, str | None]:
        method = WIDTH_SCORERS.canonical(method or "taylor")
        allocator = WIDTH_ALLOCATORS.canonical(allocator)
        if budget.pruning_ratio is None:
            raise BudgetError("Width pruning needs --pruning-ratio.")
        if nm is not None:
            raise BudgetError("--nm applies to unstructured sparsity, not to width pruning.")
        for name in ("attn_layers", "mlp_layers"):
            if name in params and not LAYER_RANGE.match(str(params[name])):
                raise BudgetError(f"--{name.replace('_', '-')} must look like 0:30 (got '{params[name]}').")
        if "rl_algo" in params:

            RL_ALGORITHMS.canonical(params["rl_algo"])
        check_params(WIDTH_ALLOCATORS.get(allocator), allocator, self.own(params)[1])
        return method, allocator, None

    def plan(self, request: PlanRequest) -> Plan:
        """Score width units, let the allocator share the budget out, and list one slice per changed sublayer
        with the units it keeps."""
        model = request.loaded.model
        options, params = self.own(request.params)
        calibration = request.calibration or CalibrationSource(request.loaded, RunSettings())
        adapter = get_adapter(model)
        blocks = adapter.num_blocks
        space = WidthSpace.from_model(
            model, request.budget.pruning_ratio, layer_range(options.get("attn_layers"), blocks, "--attn-layers"),
            layer_range(options.get("mlp_layers"), blocks, "--mlp-layers"), options.get("channel_multiple", 8))
        seq_len = options.get("taylor_seq_len", 64) if request.method == "taylor" else None
        scores = calibration.width_scores(request.method, **({"seq_len": seq_len} if seq_len else {}))
        setting = calibration.settings.latency or LatencySetting()
        cost_setting = {"tokens": setting.prompt_length, "batch": setting.batch_size, "generated": setting.decode_steps}
        context = WidthContext(model, space, calibration, scores, request.seed, cost_setting)
        allocation = WIDTH_ALLOCATORS.get(request.allocator)(context, **params)
        widths = allocation.widths
        removed = space.removed(widths)
        if abs(removed - space.target_removed) > space.rounding_unit:
            raise BudgetError(f"The {request.allocator} allocation removes {removed} parameters, more than one "
                              f"rounding unit from the target {space.target_removed}.")
        actions = [SliceAction(unit=adapter.attention(b).name, keep=kept * space.group_size[b], method=request.method,
                               seq_len=seq_len, kept=sorted(scores.ranked_groups(b)[:kept]))
                   for b, kept in widths.groups.items() if kept < space.groups[b]]
        actions += [SliceAction(unit=adapter.mlp(b).name, keep=kept, method=request.method, seq_len=seq_len,
                                kept=sorted(scores.ranked_channels(b)[:kept]))
                    for b, kept in widths.channels.items() if kept < space.channels[b]]
        dims = ModelDims.from_model(model)
        dense = estimate_costs(dims, **cost_setting)
        compressed = estimate_costs(dims.with_widths(widths.groups, widths.channels), **cost_setting)
        prediction = {"costs": compressed.model_dump(), "dense_costs": dense.model_dump(), "cost_setting": cost_setting,
                      "normalised": {k: round(v, 6) for k, v in compressed.normalised(dense).items()},
                      "flop_speedup": predicted_speedups(dense, compressed),
                      "removed_parameters": removed, "target_removed": space.target_removed,
                      "eligible_parameters": space.eligible_parameters, "rounding_unit": space.rounding_unit}
        if calibration.settings.latency_engine is not None:  # a measured latency table, where the model will run
            table = measure_width_latency_table(request.loaded, setting, calibration.settings.latency_engine)
            removed_groups = sum(space.groups[b] - kept for b, kept in widths.groups.items())
            removed_channels = sum(space.channels[b] - kept for b, kept in widths.channels.items())
            prediction["latency_speedup"] = round(table.predicted_speedup(removed_groups, removed_channels), 4)
            prediction["width_latency_table"] = table.model_dump()
        details = {**allocation.details, "search_s": allocation.seconds, "widths": widths.as_lists(blocks),
                   "dense_widths": space.dense().as_lists(blocks),
                   "group_size": next(iter(space.group_size.values()), None),
                   "calibration": calibration.describe()}  # the importance scores (which units go) depend on it
        return request.plan(actions, {**allocation.params, **options}, details, prediction)

    def stage_budget(self, budget: Budget, stage: int, stages: int) -> Budget:
        """Adapt-Pruner's linear schedule: after stage k, k/K of the target's parameters are gone; each stage's
        ratio is of the parameters the earlier stages left eligible."""
        before, after = budget.pruning_ratio * (stage - 1) / stages, budget.pruning_ratio * stage / stages
        return Budget.for_width((after - before) / (1.0 - before))

    def compose(self, plans: list[Plan], model: Any) -> Plan:
        """Each unit's slice with its kept units as indices of the original model (a later stage's indices
        count the units an earlier one kept), the last stage's widths, and costs against the dense model."""
        kept: dict[str, SliceAction] = {}
        for plan in plans:
            for action in plan.actions:
                earlier = kept.get(action.unit)
                indices = action.kept if earlier is None else [earlier.kept[i] for i in action.kept]
                kept[action.unit] = action.model_copy(update={"kept": sorted(indices)})
        first, last = plans[0], plans[-1]
        dense = CostReport.model_validate(first.prediction["dense_costs"])
        setting = first.prediction.get("cost_setting") or {}
        final = estimate_costs(ModelDims.from_model(model), **setting)
        prediction = {"costs": final.model_dump(), "dense_costs": dense.model_dump(),
                      "normalised": {k: round(v, 6) for k, v in final.normalised(dense).items()},
                      "flop_speedup": predicted_speedups(dense, final)}
        details = {key: last.details.get(key) for key in ("widths", "group_size")}
        details.update(dense_widths=first.details.get("dense_widths"), calibration=first.details.get("calibration"),
                       search_s=round(sum(p.details.get("search_s") or 0.0 for p in plans), 3),
                       stages=[{"budget": p.budget.model_dump(exclude_none=True), "widths": p.details.get("widths"),
                                "search_s": p.details.get("search_s")} for p in plans])
        return first.model_copy(update={"actions": list(kept.values()), "prediction": prediction,
                                        "details": details})

    def metrics(self, plan: Plan, loaded: LoadedModel, dense_latency: dict | None,
                extra: dict[str, Any]) -> dict[str, Any]:
        """Kept heads/channels per layer, the predicted FLOP speedups, the RL curve."""
        if not any(action.op == "slice" for action in plan.actions):
            return {}
        return {"widths": plan.details.get("widths"), "flop_speedup": plan.prediction.get("flop_speedup"),
                "rl_curve": plan.details.get("rl_curve")}

    def table_rows(self, record: dict[str, Any]) -> list[tuple[str, str, str]]:
        """The cost model's proxies dense vs compressed, FLOP-predicted vs measured speed, search time."""
        metrics = record["metrics"]
        if not metrics.get("widths"):
            return []
        dense, costs = metrics.get("dense_costs") or {}, metrics.get("costs") or {}
        rows = []
        for key, label in (("flops", "FLOPs (prefill + decode)"), ("peak_activation_bytes", "peak activation"),
                           ("kv_bytes", "KV cache")):
            if key in costs:
                value = (lambda v: f"{v / 1e9:.2f} G") if key == "flops" else fmt_bytes
                rows.append((label, value(dense[key]), value(costs[key])))
        predicted, measured = metrics.get("flop_speedup") or {}, metrics.get("speedup") or {}
        for phase in ("prefill", "decode"):
            rows.append((f"{phase} speedup FLOP-predicted / measured", "",
                         f"{fmt(predicted.get(phase), '.2f')}x / {fmt(measured.get(phase), '.2f')}x"))
        rows.append(("allocation search time", "", f"{fmt(metrics.get('pruning_s'), '.1f')} s"))
        return rows
