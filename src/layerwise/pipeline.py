"""The one pipeline: load -> plan -> apply -> evaluate -> save, used by the CLI, the API and benchmarks."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from .adapt_accel import AdaptAccel
from .cache import atomic_write_json, ensure_output_free, staged_directory
from .calibration import CalibrationSource
from .config import Budget, LatencySetting, RunSettings
from .cost import measure_paired_latency, measure_size
from .cost.analytic import model_costs
from .deploy import dense_deployment, deploy_run
from .deploy_controls import measure_controls
from .engines import ENGINES
from .engines.pytorch import pytorch_kld
from .environment import machine, versions
from .errors import PlanError, UnsupportedArchitectureError
from .export import check_exportable
from .export.gguf_export import profile_imatrix
from .healing import heal_measured
from .measure import Timings, measure_model, measured_speedup, timed
from .models import LoadedModel, decoder_linears, load, model_fingerprint, save
from .models.adapter import adapter_class
from .ops import ApplyContext, apply_plan, architecture_signature
from .plan import CalibrationRecord, Plan
from .planning import make_plan, validate_request
from .recovery import recover_with_lora
from .result import Result
from .stages import StagedRecipe
from .structures import STRUCTURES
from .version import __version__


def _record(command: str, model: dict[str, Any], settings: RunSettings, timings: Timings, **fields: Any) -> dict:
    return {
        "layerwise_version": __version__,
        "command": command,
        "model": model,
        **fields,
        "timings": timings,
        "seed": settings.seed,
        "settings": settings.model_dump(),
        "versions": versions(),
        "machine": machine(settings.device),
    }


def run_plan(
    loaded: LoadedModel,
    plan: Plan,
    settings: RunSettings,
    out: str | Path,
    overwrite: bool = False,
    command: str = "apply",
    timings: Timings | None = None,
    started: float | None = None,
    calibration: CalibrationSource | None = None,
    extra: dict[str, Any] | None = None,
    resume: bool = False,
    stages: "StageRunner | None" = None,
) -> dict:
    """Apply ``plan`` for real, measure dense and compressed perplexity and size, save model + result.json.

    ``started`` (a ``time.perf_counter`` value) lets callers include their load/plan time in ``total_s``. With
    ``stages`` (Adapt-Accel, a staged recipe) the plan is made and applied stage by stage, healing included
    (``plan`` is then None).
    """
    with contextlib.ExitStack() as scope:  # the dense export (KLD reference, controls) lives while the run does
        started = time.perf_counter() if started is None else started
        timings = dict(timings or {})
        ensure_output_free(out, overwrite)
        dense_fingerprint = model_fingerprint(loaded.model)
        dense_size = measure_size(loaded.model)
        dense_costs = _costs(loaded, settings)
        paired = settings.latency is not None and settings.latency.paired
        alone = settings.model_copy(update={"latency": None}) if paired else settings  # latency is timed in pairs below
        dense = measure_model(loaded, alone.model_copy(update={"tasks": []}), timings, "dense_", cached=True)
        dense_kld = settings.kld and settings.perplexity and not settings.reference  # KLD against the dense model
        # the dense model beside the compressed one: paired latency, healing's teacher, the KLD's reference
        reference = copy.deepcopy(loaded.model) if paired or settings.heal or dense_kld else None
        calibration = calibration or CalibrationSource(loaded, settings)
        dense_deployed = scope.enter_context(dense_deployment(loaded, settings, timings, _control_imatrix(
            loaded, settings, calibration))) if settings.deploy else None
        healing = None
        if stages is None:
            with timed(timings, "apply_s"):
                apply_plan(loaded.model, plan, ApplyContext(calibration))
        else:  # each stage plans on the model the earlier ones left (healed, for Adapt-Accel)
            with timed(timings, "stages_s"):
                plan, healing = stages.run(loaded, reference, settings, out, resume, timings)
        if settings.deploy:  # before any measuring: a plan the deployment format cannot express fails now
            check_exportable(loaded.model)
        if calibration.profile_from_cache is not None:
            timings["profile_s"] = round(calibration.profile_seconds, 3)
        recovery = _recover(loaded, settings, calibration, timings) if settings.recover_steps else None
        if settings.heal and stages is None:
            healing = heal_measured(loaded, reference, settings.heal, settings, timings, out, resume)
        compressed = measure_model(loaded, alone, timings, "", cached=False)
        kld = _kld(loaded, reference, settings, timings) if settings.kld and settings.perplexity else None
        if paired:
            with timed(timings, "latency_s"):
                pair = measure_paired_latency(reference, loaded.model, settings.latency)
            del reference
            dense["latency"], compressed["latency"] = pair.reference.model_dump(), pair.model.model_dump()
            speedup = pair.speedup
        else:
            speedup = measured_speedup(dense["latency"], compressed["latency"])
        size = measure_size(loaded.model)
        record = _record(
            command,
            {"spec": loaded.spec, "source": loaded.source},
            settings,
            timings,
            method=plan.method,
            allocator=plan.allocator,
            budget=plan.budget.model_dump(exclude_none=True),
            metrics={
                "dense_ppl": dense.get("ppl"),
                "ppl": compressed.get("ppl"),
                "sparsity": size.sparsity,
                "parameters": size.parameters,
                "nonzero_parameters": size.nonzero_parameters,
                "weight_bytes": size.weight_bytes,
                "kld": kld,
                "zeroshot": compressed["zeroshot"],
                "latency": compressed["latency"],
                "speedup": speedup,
                "dense": {
                    **dense_size.as_dict(),
                    "fingerprint": dense_fingerprint,
                    "ppl_from_cache": dense.get("ppl_from_cache"),
                    "latency": dense["latency"],
                },
                "per_unit_sparsity": _per_unit_sparsity(loaded),
                "costs": _costs(loaded, settings),
                "recovery": {**recovery, "ppl_after": compressed.get("ppl")} if recovery else None,
                "healing": {**healing, "ppl_after": compressed.get("ppl")} if healing else None,
                "dense_costs": dense_costs,
                "pruning_s": plan.details.get("search_s"),
                **_structure_metrics(plan, loaded, dense["latency"], extra or {}),
            },
            protocol=compressed.get("protocol"),
            calibration={**calibration.describe(), "profile_from_cache": calibration.profile_from_cache},
            plan=plan.model_dump(exclude_none=True),
        )
        with staged_directory(Path(out), overwrite) as staging:
            with timed(timings, "save_s"):
                save(loaded, staging, plan)
            if settings.deploy:
                deployed = deploy_run(loaded, settings, staging, timings, dense_deployed)
                record["deployment"] = {"dense": dense_deployed.record, "compressed": deployed}
                if settings.deploy.controls and settings.deploy.measure:
                    record["deployment"]["controls"] = measure_controls(loaded, settings, dense_deployed,
                                                                        deployed["weight_bytes"], timings)
            timings["total_s"] = round(time.perf_counter() - started, 3)
            record = Result.from_record(record).to_record()
            atomic_write_json(staging / "result.json", record)
        return record


def _control_imatrix(loaded: LoadedModel, settings: RunSettings, calibration: CalibrationSource) -> Optional[dict]:
    """The dense model's importance matrix for llama.cpp's recipe control (taken before the plan changes the
    model; None when no recipe control is asked for)."""
    if "recipe" not in settings.deploy.controls or not settings.deploy.measure:
        return None

    return profile_imatrix(loaded.model, calibration.profile())


def _kld(loaded: LoadedModel, dense: Optional[torch.nn.Module], settings: RunSettings, timings: Timings) -> dict:
    """KL divergence of the compressed model to ``settings.reference``, or to the dense model it came from."""
    with timed(timings, "kld_s"):
        return pytorch_kld(loaded, settings, dense)


def _recover(loaded: LoadedModel, settings: RunSettings, calibration: CalibrationSource, timings: Timings) -> dict:
    """Perplexity of the pruned model, then a short LoRA fine-tune on the calibration windows (merged)."""

    before = measure_model(loaded, settings.model_copy(update={"tasks": [], "latency": None}), timings,
                      "pre_recovery_", cached=False)
    with timed(timings, "recovery_s"):
        report = recover_with_lora(loaded.model, calibration.tokens(), settings.recover_steps, settings.recover_lr,
                                   seed=settings.seed)
    return {**report.model_dump(), "ppl_before": before.get("ppl")}


def _structure_metrics(plan: Plan, loaded: LoadedModel, dense_latency: dict | None, extra: dict) -> dict:
    """What each structure adds for its own actions in the plan (removals, widths, bits, ...)."""
    metrics: dict = {}
    for name in STRUCTURES:
        metrics.update(STRUCTURES.get(name).metrics(plan, loaded, dense_latency, extra))
    return metrics


def _costs(loaded: LoadedModel, settings: RunSettings) -> dict | None:
    """The cost model's five proxies for the model's current shapes in the run's latency setting (None for a
    family no adapter describes)."""
    setting = settings.latency or LatencySetting()
    try:
        report = model_costs(loaded.model, setting.prompt_length, setting.batch_size, setting.decode_steps)
    except UnsupportedArchitectureError:
        return None
    return report.model_dump()


def _per_unit_sparsity(loaded: LoadedModel) -> dict[str, float]:
    return {name: float((m.weight == 0).float().mean()) for name, m in decoder_linears(loaded.model).items()}


def check_before_calibration(loaded: LoadedModel, structure: str, allocator: str, budget: Budget,
                             params: dict[str, Any], settings: RunSettings) -> None:
    """Every refusal that follows from the model's family and the options alone, before any calibration: the
    export target, and what the structure's search or result needs of the family."""
    if settings.deploy:
        check_exportable(loaded.model)
    STRUCTURES.get(structure).check_model(loaded.model, allocator, budget, params, bool(settings.deploy))


def compress(
    model: str,
    budget: Budget,
    method: str | None = None,
    allocator: str = "uniform",
    settings: RunSettings | None = None,
    out: str | Path = "layerwise-out",
    overwrite: bool = False,
    nm: str | None = None,
    structure: str = "unstructured",
    eval_speedups: list[float] | None = None,
    resume: bool = False,
    iterative_steps: int = 1,
    **allocator_params: Any,
) -> dict:
    """load -> plan -> apply -> [heal] -> evaluate -> save; returns the result record also written to
    out/result.json. ``resume`` continues healing from the checkpoint an interrupted run left beside ``out``;
    ``iterative_steps`` K > 1 reaches the budget in K pruning stages, each healed (Adapt-Accel).

    For depth pruning, ``eval_speedups`` are intermediate predicted speedups at which the search's current
    model is evaluated too (perplexity, measured speed, search time so far).
    """
    settings = settings or RunSettings()
    method, allocator, _ = validate_request(method, allocator, budget, nm, allocator_params, structure)
    if STRUCTURES.get(structure).needs_adapter:
        check_adaptable(model)
    if iterative_steps > 1:  # the stage budgets are checked before any model loads
        for stage in range(1, iterative_steps + 1):
            STRUCTURES.get(structure).stage_budget(budget, stage, iterative_steps)
    ensure_output_free(out, overwrite)
    started = time.perf_counter()
    timings: Timings = {}
    with timed(timings, "load_s"):
        loaded = load(model, dtype=settings.dtype, device=settings.device)
    check_before_calibration(loaded, structure, allocator, budget, allocator_params, settings)
    calibration = CalibrationSource(loaded, settings)
    if iterative_steps > 1:
        accel = AdaptAccel(budget, method, allocator, structure, iterative_steps, allocator_params)
        return run_plan(loaded, None, settings, out, overwrite, "compress", timings, started, calibration,
                        resume=resume, stages=accel)
    records = STRUCTURES.get(structure).records_milestones
    milestones = MilestoneRecorder(loaded, settings, eval_speedups or []) if records else None
    with timed(timings, "plan_s"):
        plan = make_plan(loaded, budget, method, allocator, settings.seed, calibration, nm, structure,
                         milestones, **allocator_params)
    extra = {"milestones": milestones.records} if milestones is not None else {}
    return run_plan(loaded, plan, settings, out, overwrite, "compress", timings, started, calibration, extra, resume)


def check_adaptable(spec: str) -> None:
    """Before any weights load: a model directory whose config.json names a family without a structural
    adapter is refused now (named models and GGUF files are checked once loaded)."""

    config = Path(spec) / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (OSError, ValueError, AttributeError):  # unreadable: loading the model says what is wrong with it
        return
    if model_type:
        adapter_class(model_type)


class StageRunner(Protocol):
    """Plans and applies in stages on the model as it goes (Adapt-Accel, a staged recipe)."""

    def run(self, loaded: LoadedModel, teacher: Any, settings: RunSettings, out: str | Path, resume: bool,
            timings: Timings) -> tuple[Plan, dict | None]: ...


def compress_staged(model: str, recipe: StagedRecipe, settings: RunSettings | None = None,
                    out: str | Path = "layerwise-out", overwrite: bool = False, resume: bool = False) -> dict:
    """load -> the recipe's stages (prune -> heal -> quantize) -> evaluate -> [export] -> save, like ``compress``."""
    settings = settings or RunSettings()
    ensure_output_free(out, overwrite)
    started = time.perf_counter()
    timings: Timings = {}
    with timed(timings, "load_s"):
        loaded = load(model, dtype=settings.dtype, device=settings.device)
    for stage in recipe.stages:
        if stage.kind != "heal":
            options = stage.options
            check_before_calibration(loaded, options.chosen_structure, options.chosen_allocator, options.budget(),
                                     options.allocator_params(), settings)
    return run_plan(loaded, None, settings, out, overwrite, "compress", timings, started,
                    CalibrationSource(loaded, settings), resume=resume, stages=recipe)


class MilestoneRecorder:
    """Called after every depth-search step; evaluates the live search state the first time its predicted
    speedup reaches each requested milestone (time spent here is not counted as search time)."""

    def __init__(self, loaded: LoadedModel, settings: RunSettings, speedups: list[float]) -> None:
        self.loaded, self.settings = loaded, settings
        self.pending = sorted(speedups)
        self.records: list[dict] = []

    def __call__(self, step: Any, removed: list[str]) -> None:
        if not self.pending or step.predicted_speedup < self.pending[0]:
            return
        reached = [m for m in self.pending if step.predicted_speedup >= m]
        self.pending = [m for m in self.pending if m not in reached]
        timings: Timings = {}
        measured = measure_model(self.loaded, self.settings.model_copy(update={"tasks": []}), timings, "", cached=False)
        self.records.append({
            "milestones": reached,
            "removed": removed,
            "predicted_speedup": step.predicted_speedup,
            "pruning_s": step.elapsed_s,
            "ppl": measured.get("ppl"),
            "latency": measured["latency"],
        })


def plan_to_file(
    model: str,
    budget: Budget,
    out: str | Path,
    method: str | None = None,
    allocator: str = "uniform",
    settings: RunSettings | None = None,
    overwrite: bool = False,
    nm: str | None = None,
    structure: str = "unstructured",
    **allocator_params: Any,
) -> Plan:
    """Compute a plan (calibrating if the allocator needs it) and write it as JSON; weights are untouched."""
    settings = settings or RunSettings()
    _, canonical, _ = validate_request(method, allocator, budget, nm, allocator_params, structure)
    ensure_output_free(out, overwrite, "Plan file")
    loaded = load(model, dtype=settings.dtype, device=settings.device)
    check_before_calibration(loaded, structure, canonical, budget, allocator_params, settings)
    calibration = CalibrationSource(loaded, settings)
    plan = make_plan(loaded, budget, method, allocator, settings.seed, calibration, nm, structure,
                     **allocator_params)
    plan.save(out)
    return plan


def check_calibration_options(plan: Plan, given: dict[str, Any]) -> None:
    """Refuse calibration options (RunSettings fields the user gave) that contradict the plan's record: applying
    it draws the plan's windows."""
    if plan.calibration is None:
        return
    for option, value in given.items():
        recorded = getattr(plan.calibration, CalibrationRecord.SETTINGS[option])
        if value is not None and str(value) != str(recorded):
            raise PlanError(f"The plan was computed on calibration with --{option.replace('_', '-')} {recorded}, and "
                            f"applying it uses that calibration again (the same windows, so the same weights); "
                            f"drop --{option.replace('_', '-')} {value}, or make a new plan with it.")


def apply_plan_file(
    model: str, plan_path: str | Path, settings: RunSettings | None = None, out: str | Path = "layerwise-out",
    overwrite: bool = False, calibration: dict[str, Any] | None = None, other_weights: bool = False,
) -> dict:
    """Apply a saved plan to a fresh copy of ``model``, then evaluate and save like ``compress``.

    A plan that records its calibration is applied on exactly those windows (whatever ``settings`` evaluates
    on), so the result equals ``compress``'s; ``calibration`` (the options the user gave: nsamples,
    calib_seqlen, calib_text) must agree with that record. Older plans calibrate as ``settings`` say."""
    settings = settings or RunSettings()
    plan = Plan.load(plan_path)
    check_calibration_options(plan, calibration or {})
    ensure_output_free(out, overwrite)
    started = time.perf_counter()
    timings: Timings = {}
    with timed(timings, "load_s"):
        loaded = load(model, dtype=settings.dtype, device=settings.device)
    same_architecture = plan.architecture == architecture_signature(loaded.model)  # else apply says how they differ
    if (plan.weights is not None and same_architecture and not other_weights
            and plan.weights != model_fingerprint(loaded.model)):
        raise PlanError(f"The plan was computed on other weights (fingerprint {plan.weights}) than {model}'s "
                        f"({model_fingerprint(loaded.model)}) at --dtype {settings.dtype}; its per-layer choices "
                        "belong to those weights. Make a plan for this model, or pass --other-weights to apply it.")
    source = (CalibrationSource.for_plan(loaded, settings, plan.calibration) if plan.calibration is not None
              else CalibrationSource(loaded, settings))
    return run_plan(loaded, plan, settings, out, overwrite, "apply", timings, started, source)


def evaluate_model(
    model: str, settings: RunSettings | None = None, out: str | Path | None = None, overwrite: bool = False
) -> dict:
    """Perplexity, zero-shot scores, size and latency of a model (named, a path, or a saved layerwise directory)."""
    settings = settings or RunSettings()
    if out is not None:
        ensure_output_free(out, overwrite)

    timings: Timings = {}
    evaluation = ENGINES.get(settings.engine)(model, settings, timings)
    record = Result.from_record(_record("eval", evaluation.model, settings, timings, metrics=evaluation.metrics,
                                        protocol=evaluation.protocol, **evaluation.extra)).to_record()
    if out is not None:
        with staged_directory(Path(out), overwrite) as staging:
            atomic_write_json(staging / "result.json", record)
    return record
