"""Turning a request (method, allocator, budget, options) into a Plan; allocators never touch weights."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any, Callable

import re

from .allocate import (ALLOCATORS, DEPTH_ALLOCATORS, WIDTH_ALLOCATORS, AllocationContext, DepthContext, DepthStep,
                       WidthContext, WidthSpace)
from .backends import SPARSIFIERS, architecture_signature
from .config import Budget, LatencySetting, RunSettings
from .cost import measure_latency_table
from .errors import BudgetError, LayerwiseError
from .models import LoadedModel, decoder_linears, get_adapter
from .cost.analytic import ModelDims, estimate_costs, predicted_speedups
from .allocate.bits import BIT_ALLOCATORS
from .plan import Plan, RemoveAction, SliceAction, SparsifyAction, TuneSpec
from .profile import CalibrationSource
from .profile.width import WIDTH_SCORERS
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
    if structure == "width":
        return (*_check_width_request(method, allocator, budget, nm, allocator_params), None)
    if structure == "quant":
        return (*_check_quant_request(method, allocator, nm, allocator_params), None)
    method = method or "magnitude"
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


# Options of the width structure itself (which layers, rounding, importance), not of any allocator.
WIDTH_OPTIONS = {"attn_layers", "mlp_layers", "channel_multiple", "taylor_seq_len"}
LAYER_RANGE = re.compile(r"^(\d*):(\d*)$")


def _check_width_request(method: str | None, allocator: str, budget: Budget, nm: str | None,
                         params: dict[str, Any]) -> tuple[str, str]:
    method = WIDTH_SCORERS.canonical(method or "taylor")
    allocator = WIDTH_ALLOCATORS.canonical(allocator)
    if budget.pruning_ratio is None:
        raise BudgetError("Width pruning needs --pruning-ratio.")
    if nm is not None:
        raise BudgetError("--nm applies to unstructured sparsity, not to width pruning.")
    for option in ("attn_layers", "mlp_layers"):
        if option in params and not LAYER_RANGE.match(str(params[option])):
            raise BudgetError(f"--{option.replace('_', '-')} must look like 0:30 (got '{params[option]}').")
    if "rl_algo" in params:
        from .allocate.rl_training import RL_ALGORITHMS

        RL_ALGORITHMS.canonical(params["rl_algo"])
    _check_params(WIDTH_ALLOCATORS.get(allocator), allocator, {k: v for k, v in params.items() if k not in WIDTH_OPTIONS})
    return method, allocator


# Options of the quantization structure (bit choices, grouping, symmetry, GGUF settings), not of any bit allocator.
QUANT_OPTIONS = {"bits", "group_size", "symmetric", "awq", "act_order", "imatrix", "embedding_type",
                 "llamacpp_activations"}


def _check_quant_request(method: str | None, allocator: str, nm: str | None, params: dict[str, Any]) -> tuple[str, str]:
    from .allocate.levels import GGUFLevels, parse_levels
    from .backends.quantize import QUANTIZERS

    levels = parse_levels(params.get("bits", "4"), imatrix=bool(params.get("imatrix", False)))
    gguf = isinstance(levels, GGUFLevels)
    if gguf and method not in (None, "gguf"):
        raise BudgetError(f"GGUF types are quantized by llama.cpp's own quantizers; --method {method} does not apply.")
    method = QUANTIZERS.canonical(method or ("gguf" if gguf else "rtn"))
    if method == "gguf" and not gguf:
        raise BudgetError("--method gguf needs GGUF types in --bits (e.g. q4_k,q6_k,q8_0).")
    allocator = BIT_ALLOCATORS.canonical(allocator)
    if nm is not None:
        raise BudgetError("--nm applies to unstructured sparsity, not to quantization.")
    if params.get("group_size") is not None and int(params["group_size"]) < 0:
        raise BudgetError(f"--group-size must be 0 (per channel) or a positive number of inputs "
                          f"(got {params['group_size']}).")
    if params.get("act_order") and method != "gptq":
        raise BudgetError("--act-order applies to the gptq method only.")
    if params.get("llamacpp_activations") and not gguf:
        raise BudgetError("--llamacpp-activations applies to GGUF types, whose activations llama.cpp rounds.")
    if gguf and params.get("awq"):
        raise BudgetError("--awq applies to layerwise's own grid, not to GGUF types.")
    if "embedding_type" in params:
        from .gguf import gguf_type

        gguf_type(params["embedding_type"])
    _check_params(BIT_ALLOCATORS.get(allocator), allocator,
                  {k: v for k, v in params.items() if k not in QUANT_OPTIONS})
    return method, allocator


def layer_range(text: str | None, blocks: int, option: str) -> range:
    """``start:end`` (either may be empty) as a range of block indices, checked against the model."""
    if text is None:
        return range(blocks)
    start, end = LAYER_RANGE.match(text).groups()
    chosen = range(int(start or 0), int(end) if end else blocks)
    if chosen.start >= chosen.stop or chosen.stop > blocks:
        raise BudgetError(f"{option} {text} does not select layers of this {blocks}-block model.")
    return chosen


def make_plan(
    loaded: LoadedModel,
    budget: Budget,
    method: str | None = None,
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
            calibration=self.calibration.record() if self.calibration is not None else None,
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
    engine = (settings.latency_engine if settings is not None else None) or "pytorch"
    table = measure_latency_table(request.loaded, setting, engine)
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


@STRUCTURES.register("width")
def _width_plan(request: PlanRequest) -> Plan:
    """Score width units, let the allocator share the budget out, and list one slice per changed sublayer."""
    model = request.loaded.model
    params = dict(request.params)
    options = {k: params.pop(k) for k in list(params) if k in WIDTH_OPTIONS}
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
        raise BudgetError(f"The {request.allocator} allocation removes {removed} parameters, more than one rounding "
                          f"unit from the target {space.target_removed}.")
    actions = [SliceAction(unit=adapter.attention(b).name, keep=kept * space.group_size[b], method=request.method,
                           seq_len=seq_len, kept=sorted(scores.ranked_groups(b)[:kept]))
               for b, kept in widths.groups.items() if kept < space.groups[b]]
    actions += [SliceAction(unit=adapter.mlp(b).name, keep=kept, method=request.method, seq_len=seq_len,
                            kept=sorted(scores.ranked_channels(b)[:kept]))
                for b, kept in widths.channels.items() if kept < space.channels[b]]
    dims = ModelDims.from_model(model)
    dense = estimate_costs(dims, **cost_setting)
    compressed = estimate_costs(dims.with_widths(widths.groups, widths.channels), **cost_setting)
    prediction = {"costs": compressed.model_dump(), "dense_costs": dense.model_dump(),
                  "normalised": {k: round(v, 6) for k, v in compressed.normalised(dense).items()},
                  "flop_speedup": predicted_speedups(dense, compressed),
                  "removed_parameters": removed, "target_removed": space.target_removed,
                  "eligible_parameters": space.eligible_parameters, "rounding_unit": space.rounding_unit}
    if calibration.settings.latency_engine is not None:  # a measured latency table, where the model will run
        from .cost.latency_table import measure_width_latency_table

        table = measure_width_latency_table(request.loaded, setting, calibration.settings.latency_engine)
        removed_groups = sum(space.groups[b] - kept for b, kept in widths.groups.items())
        removed_channels = sum(space.channels[b] - kept for b, kept in widths.channels.items())
        prediction["latency_speedup"] = round(table.predicted_speedup(removed_groups, removed_channels), 4)
        prediction["width_latency_table"] = table.model_dump()
    details = {**allocation.details, "search_s": allocation.seconds, "widths": widths.as_lists(blocks),
               "dense_widths": space.dense().as_lists(blocks), "group_size": next(iter(space.group_size.values()), None),
               "calibration": calibration.describe()}  # the importance scores (which units go) depend on it
    return request.plan(actions, {**allocation.params, **options}, details, prediction)


@STRUCTURES.register("quant")
def _quant_plan(request: PlanRequest) -> Plan:
    """Let the bit allocator pick each decoder linear's level; one quantize action per linear."""
    from .allocate.bits import BitContext, linear_statistics
    from .allocate.levels import GGUFLevels
    from .backends.quantize import group_bounds

    params = dict(request.params)
    options = {k: params.pop(k) for k in list(params) if k in QUANT_OPTIONS}
    group_size = options.get("group_size", 128) or None
    symmetric = bool(options.get("symmetric", False))
    linears = decoder_linears(request.loaded.model)
    context = BitContext(request.loaded.model, linears, str(options.get("bits", "4")).split(","), group_size,
                         symmetric, request.calibration, request.seed, bool(options.get("imatrix", False)),
                         bool(options.get("llamacpp_activations", False)))
    gguf = isinstance(context.levels, GGUFLevels)
    fixed_bytes = None
    if request.budget.max_bytes is not None:
        if not gguf:
            raise BudgetError("--max-bytes counts bytes as llama.cpp stores them; use GGUF types in --bits.")
        from .export.gguf_export import non_linear_bytes

        fixed_bytes = non_linear_bytes(request.loaded.model, options.get("embedding_type", "q8_0"))
        if request.budget.max_bytes <= fixed_bytes:
            raise BudgetError(f"--max-bytes {request.budget.max_bytes:,} does not even hold the embeddings and norms "
                              f"({fixed_bytes:,} bytes).")
        params["max_bits"] = 8 * (request.budget.max_bytes - fixed_bytes)
    allocation = BIT_ALLOCATORS.get(request.allocator)(context, avg_bits=request.budget.avg_bits, **params)
    params.pop("max_bits", None)
    achieved = context.average_bits(allocation.bits)
    if request.budget.avg_bits is not None and achieved > request.budget.avg_bits + 1e-9:
        raise BudgetError(f"The {request.allocator} allocation averages {achieved:.4f} bits, over the budget "
                          f"{request.budget.avg_bits}.")
    linear_bytes = context.total_bits(allocation.bits) / 8
    if fixed_bytes is not None and linear_bytes + fixed_bytes > request.budget.max_bytes:
        raise BudgetError(f"The {request.allocator} allocation needs {linear_bytes + fixed_bytes:,.0f} bytes, over "
                          f"--max-bytes {request.budget.max_bytes:,}.")
    awq = bool(options.get("awq", False))
    # GPTQ goes in activation order unless told otherwise: on smollm2-135m plain GPTQ loses to RTN (RESULTS.md)
    act_order = request.method == "gptq" and bool(options.get("act_order", True))
    action_options = {"awq": awq, "act_order": act_order}
    actions = [context.levels.action(name, level, request.method, action_options)
               for name, level in allocation.bits.items()]
    prediction = {"avg_bits": round(achieved, 6), "memory_saving_vs_16bit": round(1 - achieved / 16, 6),
                  "linear_bytes": int(round(linear_bytes))}
    if gguf:
        from .export.gguf_export import non_linear_bytes

        embedding_type = options.get("embedding_type", "q8_0")
        prediction["gguf_tensor_bytes"] = int(round(linear_bytes)) + non_linear_bytes(request.loaded.model,
                                                                                      embedding_type)
        prediction["embedding_type"] = embedding_type
    else:
        widths = {linear.in_features for linear in linears.values()}
        prediction["last_group_width"] = {str(w): [e - s for s, e in group_bounds(w, group_size)][-1]
                                          for w in sorted(widths)}
    details = {**allocation.details, "bits": {name: str(level) for name, level in allocation.bits.items()},
               "levels": context.levels.describe(), "group_size": group_size, "symmetric": symmetric,
               "awq": awq, "act_order": act_order,
               "statistics": linear_statistics(context) if request.calibration is not None else None}
    return request.plan(actions, {**allocation.params, **options}, details, prediction)
