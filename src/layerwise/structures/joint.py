"""Joint: one search over every kind of action under one deployment budget. Per block, the attention keeps a
number of KV groups or goes, the MLP keeps a width or goes, and each kept sublayer's linears get a GGUF type;
the budget is GGUF bytes (as the export stores them) and/or a predicted speedup (measured latency tables)."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from ..allocate.joint import JOINT_SEARCHERS, ModelBySpec, ScoringSetup, build_space, dense_logprobs, make_evaluator
from ..allocate.joint.searchers import least_damaging_repair
from ..allocate.joint.space import Budgets, Genome, JointSpace
from ..allocate.levels import GGUFLevels
from ..calibration.width import WIDTH_SCORERS
from ..config import Budget, LatencySetting
from ..cost.latency_table import latency_engine
from ..cost.typed_latency import TYPE_DEPENDENT_ENGINES, typed_paired_latency
from ..errors import BudgetError, LayerwiseError
from ..export import check_structure_exportable
from ..export.gguf_export import embedding_bytes
from ..formatting import fmt, fmt_bytes
from ..gguf import gguf_type
from ..models import LoadedModel, decoder_linears, get_adapter
from ..ops import ApplyContext, apply_plan
from ..ops.depth import RemoveAction
from ..ops.quantize import QuantizeAction
from ..ops.structured import SliceAction
from ..plan import Plan
from .base import PlanRequest, Structure, StructureOptions, check_params, option, register
from .depth import DepthOptions
from .latency_probes import (
    measure_latency_table,
    measure_level_latency_table,
    measure_typed_level_latency_table,
    typed_copy,
)
from .quant import QuantOptions
from .speed_guard import guard_speed, speedup_of

if TYPE_CHECKING:
    from ..options import PlanOptions

DEFAULT_TYPES = "f16,q8_0,q6_k,q5_k,q4_k,q3_k"


def _fractions(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise BudgetError(f"{flag} takes fractions like 1,0.67,0.33 (got '{text}').") from None


class JointOptions(StructureOptions):
    """The joint search: budgets, the levels of its space, how many candidates and where they are scored."""

    max_bytes: Optional[int] = QuantOptions.model_fields["max_bytes"]
    target_speedup: Optional[float] = DepthOptions.model_fields["target_speedup"]
    embedding_type: Optional[str] = QuantOptions.model_fields["embedding_type"]
    joint_types: Optional[str] = option(f"joint: GGUF types a kept sublayer may take (default {DEFAULT_TYPES}).")
    joint_attention_widths: Optional[str] = option("joint: fractions of the KV groups an attention may keep "
                                                   "(default 1,0.67,0.33).")
    joint_mlp_widths: Optional[str] = option("joint: fractions of the FFN channels an MLP may keep, rounded to "
                                             "the types' block (default 1,0.67,0.33).")
    joint_remove: Optional[bool] = option("joint: sublayers may also be removed (default on).",
                                          "--joint-remove/--no-joint-remove")
    candidates: Optional[int] = option("joint: candidate evaluations the search may spend (default 200).")
    first_stage_windows: Optional[int] = option("joint: calibration windows of the first, cheap scoring step "
                                                "(default 1; the second uses all).")
    speed_guard: Optional[bool] = DepthOptions.model_fields["speed_guard"]
    workers: Optional[int] = option("joint: score candidates on this many Ray workers (0: in this process).")
    ray_address: Optional[str] = option("joint: join the Ray cluster at this address instead of starting one.")


def _space(model: nn.Module, options: dict[str, Any], budgets: Budgets, typed: bool):
    """The search space the options describe, under ``budgets`` (no latency tables yet)."""

    fixed = embedding_bytes(model, options.get("embedding_type") or "q8_0") + 4 * int(model.config.hidden_size)
    return build_space(model, (options.get("joint_types") or DEFAULT_TYPES).split(","),
                       _fractions(options.get("joint_attention_widths") or "1,0.67,0.33", "--joint-attention-widths"),
                       _fractions(options.get("joint_mlp_widths") or "1,0.67,0.33", "--joint-mlp-widths"),
                       options.get("joint_remove") is not False, budgets, fixed, types_change_speed=typed)


@register
class Joint(Structure):
    name = "joint"
    needs_adapter = True
    options = JointOptions
    allocators = JOINT_SEARCHERS
    # every candidate is one forward pass over these windows: 4 x 128 tokens keep a candidate under a second
    calibration_defaults = {"nsamples": 4, "calib_seqlen": 128}

    def budget(self, options: "PlanOptions") -> Budget:
        return Budget.for_joint(options.max_bytes, options.target_speedup)

    def check_model(self, model: Any, allocator: str, budget: Budget, params: dict[str, Any], deploy: bool) -> None:

        if budget.max_bytes is not None:  # a byte budget no level reaches fails now, saying the smallest that does
            _space(model, self.own(params)[0], Budgets(budget.max_bytes, None), False).uniform()
        if deploy:  # each sublayer chooses its own width level, or removal
            attention = any(w < 1 for w in _fractions(params.get("joint_attention_widths") or "1,0.67,0.33",
                                                      "--joint-attention-widths"))
            mlp = any(w < 1 for w in _fractions(params.get("joint_mlp_widths") or "1,0.67,0.33",
                                                "--joint-mlp-widths"))
            check_structure_exportable(model, removes=params.get("joint_remove") is not False,
                                       per_layer=attention or mlp, narrows_attention=attention)

    def validate(self, method: str | None, allocator: str, budget: Budget, nm: str | None,
                 params: dict[str, Any]) -> tuple[str, str, str | None]:

        if allocator == "uniform":  # the CLI's default allocator means "not chosen"
            raise LayerwiseError("The joint search needs a searcher: --allocator evo, rl or greedy.")
        allocator = JOINT_SEARCHERS.canonical(allocator)
        method = WIDTH_SCORERS.canonical(method or "taylor")
        if nm is not None:
            raise BudgetError("--nm applies to unstructured sparsity, not to the joint search.")
        GGUFLevels((params.get("joint_types") or DEFAULT_TYPES).split(","))  # known types, f32 refused
        for key, flag in (("joint_attention_widths", "--joint-attention-widths"),
                          ("joint_mlp_widths", "--joint-mlp-widths")):
            if key in params:
                _fractions(params[key], flag)
        for key in ("candidates", "first_stage_windows"):
            if key in params and int(params[key]) < 1:
                raise BudgetError(f"--{key.replace('_', '-')} must be at least 1 (got {params[key]}).")
        if int(params.get("workers") or 0) < 0:
            raise BudgetError(f"--workers must be 0 or more (got {params['workers']}).")
        if "embedding_type" in params:
            gguf_type(params["embedding_type"])
        check_params(JOINT_SEARCHERS.get(allocator), allocator, self.own(params)[1])
        return method, allocator, None

    def plan(self, request: PlanRequest) -> Plan:
        """Build the space and its cost tables, score the dense model once, search, and write the genome as
        removals, slices (kept units in importance order) and one GGUF type per kept linear."""

        if request.calibration is None:
            raise LayerwiseError("The joint search scores candidates on calibration windows; give it some.")
        loaded, calibration = request.loaded, request.calibration
        model = loaded.model
        options, params = self.own(request.params)
        embedding_type = options.get("embedding_type", "q8_0")
        budgets = Budgets(request.budget.max_bytes, request.budget.target_speedup)
        engine = latency_engine(calibration.settings.latency_engine or "pytorch")
        typed = request.budget.target_speedup is not None and engine in TYPE_DEPENDENT_ENGINES
        space = _space(model, options, budgets, typed)
        setting = calibration.settings.latency or LatencySetting()
        if request.budget.target_speedup is not None:
            _attach_latency_tables(loaded, setting, space, engine, embedding_type)
        space.uniform()  # a clear BudgetError now when nothing fits
        seq_len = 64 if request.method == "taylor" else None
        scores = calibration.width_scores(request.method, **({"seq_len": seq_len} if seq_len else {}))
        groups = {b: scores.ranked_groups(b) for b in scores.groups}
        channels = {b: scores.ranked_channels(b) for b in scores.channels}
        tokens = calibration.tokens()
        batch = calibration.settings.calib_batch_size
        timings = []  # a warm dense pass (forward and log-softmax, a candidate's work without the swap): the unit
        for _ in range(3):  # of the candidate cost ratio
            start = time.perf_counter()
            reference = dense_logprobs(model, tokens, batch)
            timings.append(time.perf_counter() - start)
        dense_seconds = statistics.median(timings)
        first = min(int(options.get("first_stage_windows", 1)), tokens.shape[0])
        setup = ScoringSetup(space, groups, channels, tokens, reference, (first, tokens.shape[0]), batch,
                             torch.get_num_threads())
        candidates = int(options.get("candidates", 200))
        by_spec = ModelBySpec(loaded.spec, calibration.settings.dtype, calibration.settings.device)
        evaluator = make_evaluator(model, setup, int(options.get("workers") or 0), options.get("ray_address"), by_spec)
        guard: list[dict[str, float]] = []
        try:
            started = time.perf_counter()
            outcome = JOINT_SEARCHERS.get(request.allocator)(space, evaluator, candidates, request.seed, **params)
            search_s = time.perf_counter() - started
            searched = evaluator.evaluations
            genome = outcome.genome
            if not space.fits(genome):  # the searchers only keep fitting genomes; this guards the contract
                raise BudgetError(f"The {request.allocator} search returned a plan over the budget.")
            if request.budget.target_speedup is not None and options.get("speed_guard", True):
                def actions(genome: Genome) -> list:
                    return _actions(model, space, genome, groups, channels, request.method, seq_len)

                measure = (typed_speedup(request, space, actions, setting, engine, embedding_type) if typed
                           else paired_speedup(request, actions, setting))
                genome, guard = guard_speed(request.budget.target_speedup, genome, measure,
                                            lambda genome: space.costs(genome)["predicted_speedup"],
                                            lambda genome, budget: repaired_for(space, evaluator, genome, budget))
            score = evaluator.score([genome], len(setup.stage_windows) - 1)[0]  # memoised unless repaired
        finally:
            evaluator.close()
        actions = _actions(model, space, genome, groups, channels, request.method, seq_len)
        # a candidate's cost: the median full-stage candidate (the first use of a level also builds it in the bank)
        per_candidate = statistics.median(evaluator.per_candidate) if evaluator.per_candidate else float("nan")
        costs = space.costs(genome)
        prediction = {**costs, "gguf_tensor_bytes": costs["bytes"], "speedup": costs.get("predicted_speedup"),
                      "embedding_type": embedding_type, "calibration_kl": round(score, 6),
                      "candidate_cost_ratio": round(per_candidate / max(dense_seconds, 1e-9), 4)}
        for key, table in (("latency_table", space.latency), ("width_latency_table", space.width_latency),
                           ("typed_latency_table", space.typed_latency)):
            if table is not None:
                prediction[key] = table.model_dump()
        details = {**outcome.details, "levels": space.describe(genome), "search_s": round(search_s, 2),
                   "speed_guard": guard,
                   "evaluations": searched, "repair_evaluations": evaluator.evaluations - searched,
                   "tokens_scored": evaluator.tokens,
                   "curve": outcome.curve, "space_log10": round(space.size(), 2),
                   "workers": int(options.get("workers") or 0)}
        return request.plan(actions, {**outcome.params, **options, "candidates": candidates}, details, prediction)

    def metrics(self, plan: Plan, loaded: LoadedModel, dense_latency: dict | None,
                extra: dict[str, Any]) -> dict[str, Any]:
        """The predicted bytes and speedup, the search's evaluations and its best-so-far curve."""
        if "calibration_kl" not in plan.prediction:
            return {}
        return {"joint_levels": plan.details.get("levels"), "predicted_bytes": plan.prediction.get("bytes"),
                "predicted_speedup": plan.prediction.get("predicted_speedup"),
                "evaluations": plan.details.get("evaluations"), "search_curve": plan.details.get("curve"),
                "candidate_cost_ratio": plan.prediction.get("candidate_cost_ratio")}

    def table_rows(self, record: dict[str, Any]) -> list[tuple[str, str, str]]:
        metrics = record["metrics"]
        if metrics.get("evaluations") is None:
            return []
        speedup = metrics.get("speedup") or {}
        rows = [("GGUF tensor bytes (predicted)", "", fmt_bytes(metrics["predicted_bytes"]))]
        if not metrics.get("removed_sublayers"):  # with removals, the depth rows show the speedups
            rows.append(("speedup predicted / measured", "",
                         f"{fmt(metrics.get('predicted_speedup'), '.2f')}x / {fmt(speedup.get('total'), '.2f')}x"))
        return rows + [("candidates evaluated (cost vs a dense pass)", "",
                        f"{metrics['evaluations']} ({fmt(metrics.get('candidate_cost_ratio'), '.2f')}x)")]


def paired_speedup(request: PlanRequest, actions: Callable[[Genome], list], setting: LatencySetting
                   ) -> Callable[[Genome], float]:
    """PyTorch: the genome's removals and slices applied to a copy of the model, timed in alternating runs with the
    dense model, the way the result is measured (types do not change its speed)."""

    def measure(genome: Genome) -> float:
        structure = [a for a in actions(genome) if isinstance(a, (RemoveAction, SliceAction))]
        return speedup_of(request.loaded, lambda trial: apply_plan(trial, request.plan(structure, {}, {}),
                                                                    ApplyContext(request.calibration)),
                          setting, "pytorch")
    return measure


def repaired_for(space: JointSpace, evaluator, genome: Genome, budget: float) -> Genome | None:
    """The guard's re-plan for the joint search: the space's speed budget raised to ``budget``, the genome
    repaired by its least damaging cheaper moves."""
    space.budgets = Budgets(space.budgets.max_bytes, budget)
    return least_damaging_repair(space, evaluator, genome)


def typed_speedup(request: PlanRequest, space: JointSpace, actions: Callable[[Genome], list],
                  setting: LatencySetting, engine: str, embedding_type: str) -> Callable[[Genome], float]:
    """llama.cpp decode: the dense model at the table's reference type against the genome's removals and slices
    with each kept linear at its planned type (empty GGUF linears: speed does not depend on the values),
    exported and timed the way the table was."""

    reference = space.typed_latency.reference_type
    dense = typed_copy(request.loaded, lambda model: None, lambda name: reference)

    def measure(genome: Genome) -> float:
        planned = actions(genome)
        structure = [a for a in planned if isinstance(a, (RemoveAction, SliceAction))]
        types = {a.unit: a.format for a in planned if isinstance(a, QuantizeAction)}

        def change(model: nn.Module) -> None:
            apply_plan(model, request.plan(structure, {}, {}), ApplyContext(request.calibration))

        trial = typed_copy(request.loaded, change, lambda name: types.get(name, reference))
        return typed_paired_latency(dense, trial, setting, engine, embedding_type).speedup["decode"]
    return measure


def _attach_latency_tables(loaded: LoadedModel, setting: LatencySetting, space: JointSpace, engine: str,
                           embedding_type: str) -> None:
    """The tables the speed budget predicts with: in an engine whose speed depends on the GGUF types
    (llama.cpp's decode), one typed table over every (width, type) level and removal; in PyTorch, the removal
    table (SPRINT's) and the per-level width table."""

    if engine in TYPE_DEPENDENT_ENGINES:
        levels = {kind: sorted({(level.kept, level.kind) for unit in space.units if unit.kind == kind
                                for level in unit.levels}) for kind in ("attention", "mlp")}
        space.typed_latency = measure_typed_level_latency_table(loaded, levels, space.kinds[0], embedding_type,
                                                                setting, engine)
        return
    if engine != "pytorch":
        raise BudgetError(f"The joint search's speed budget has no latency tables for the {engine} engine.")
    levels = {kind: sorted({level.kept for unit in space.units if unit.kind == kind for level in unit.levels
                            if 0 < level.kept < unit.total}) for kind in ("attention", "mlp")}
    space.latency = measure_latency_table(loaded, setting, "pytorch")
    space.width_latency = measure_level_latency_table(loaded, levels, setting, "pytorch")


def _actions(model, space, genome, groups, channels, method, seq_len) -> list:

    stored = GGUFLevels(space.kinds)
    adapter = get_adapter(model)
    linears = list(decoder_linears(model))
    removals, slices, quantized = [], [], []
    for unit, index in zip(space.units, genome):
        level = unit.levels[index]
        if level.removed:
            removals.append(RemoveAction(unit=unit.name))
            continue
        if level.kept < unit.total:
            if unit.kind == "attention":
                group_size = adapter.head_geometry(unit.block).group_size
                slices.append(SliceAction(unit=unit.name, keep=level.kept * group_size, method=method,
                                          seq_len=seq_len, kept=groups[unit.block][: level.kept]))
            else:
                slices.append(SliceAction(unit=unit.name, keep=level.kept, method=method, seq_len=seq_len,
                                          kept=channels[unit.block][: level.kept]))
        quantized += [stored.action(name, level.kind, "gguf", {}) for name in linears if name.startswith(unit.name + ".")]
    return removals + slices + quantized
