"""Bit allocation: which bit width each decoder linear is stored at. The budget is a parameter-weighted
average bit width (``avg_bits``) over the decoder linears; every allocator's plan stays at or under it.

- ``uniform``: one width everywhere (the largest choice within the budget, or ``bits`` when unbudgeted);
- ``greedy``: start every linear at the widest choice and repeatedly narrow the one whose sensitivity
  grows least per bit saved, until the average fits the budget, then widen again wherever the remainder
  still allows.

Sensitivity of a linear at a width (``SENSITIVITIES``), measured with only that linear rounded to that width
on a few calibration windows, so layers are compared by what they do to the model's output: ``kl`` (default)
is the mean KL divergence of the next-token distribution from the dense model's, ``ppl`` the increase of
ln PPL (noisier); ``error`` is the activation-weighted RTN error Σ_j ‖X_j‖²·‖W_:j − Ŵ_:j‖² (no forward
passes, but not comparable across layers of different roles).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..cache import atomic_write_json, cache_dir, read_json, stable_hash
from ..calibration.sublayers import SublayerStream
from ..component_options import ComponentOptions, declares, option
from ..errors import BudgetError
from ..evaluate.perplexity import next_token_nll
from ..gguf.activations import round_activations
from ..models.discovery import find_blocks
from ..models.fingerprint import model_fingerprint
from ..registry import Registry
from .levels import GGUFLevels, Level, LevelSet, parse_levels


@dataclass
class BitContext:
    """What a bit allocator reads: the decoder linears, the quantization levels and the calibration.

    ``choices`` are bit widths of layerwise's own grid (with ``group_size`` and ``symmetric``) or GGUF type
    names; ``levels`` is the resulting ``LevelSet``. Budgets are in stored bits over all the decoder linears.
    """

    model: nn.Module
    linears: dict[str, nn.Linear]
    choices: list
    group_size: int | None
    symmetric: bool
    calibration: Any = None
    seed: int = 0
    imatrix: bool = False
    activation_rounding: bool = False  # GGUF: score candidates with llama.cpp's rounding of activations
    levels: LevelSet = field(init=False)
    _sensitivities: dict[tuple, dict[str, dict[Level, float]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.levels = parse_levels(self.choices, self.group_size, self.symmetric, self.imatrix)
        self.choices = list(self.levels.choices)
        if self.activation_rounding and not isinstance(self.levels, GGUFLevels):
            raise BudgetError("--llamacpp-activations applies to GGUF types, whose activations llama.cpp rounds.")

    @contextlib.contextmanager
    def rounding(self) -> Iterator["ActivationRounding | None"]:
        """Hooks rounding each linear's inputs as llama.cpp would at its current level (None when off)."""
        if not self.activation_rounding:
            yield None
            return
        hooks = ActivationRounding(self.linears)
        try:
            yield hooks
        finally:
            hooks.remove()

    def sizes(self) -> dict[str, int]:
        return {name: linear.weight.numel() for name, linear in self.linears.items()}

    def options(self, name: str) -> list[Level]:
        """The distinct levels ``name`` can be stored at, narrowest first."""
        return self.levels.levels(self.linears[name])

    def stored(self, name: str, level: Level) -> Level:
        return self.levels.stored(self.linears[name], level)

    def bits(self, name: str, level: Level) -> float:
        """Stored bits of the whole linear ``name`` at ``level``."""
        return self.linears[name].weight.numel() * self.levels.bits(self.linears[name], level)

    def total_bits(self, assignment: dict[str, Level]) -> float:
        return sum(self.bits(name, level) for name, level in assignment.items())

    def average_bits(self, assignment: dict[str, Level]) -> float:
        """Parameter-weighted mean of stored bits per weight."""
        return self.total_bits(assignment) / sum(self.sizes().values())

    def importance(self, name: str):
        """llama.cpp's importance-matrix entry for ``name`` (mean squared input per column), when asked for."""
        if not self.imatrix:
            return None
        stats = self.calibration.profile().units[name]
        return (stats.sum_sq / max(1, stats.tokens)).to(torch.float32).numpy()

    def round_trip(self, name: str, level: Level) -> torch.Tensor:
        return self.levels.round_trip(self.linears[name], level, self.importance(name))


class ActivationRounding:
    """Forward pre-hooks on the decoder linears: a linear whose ``levels`` entry names a GGUF type gets its
    input rounded as llama.cpp rounds it for that type (``None``: computed in float, as a dense linear)."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.levels: dict[str, Level | None] = dict.fromkeys(linears)
        self.handles = [linear.register_forward_pre_hook(self._hook(name)) for name, linear in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple):
            level = self.levels[name]
            return None if level is None else (round_activations(args[0], level), *args[1:])

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class BitAllocation:
    bits: dict[str, Level]
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


ACTIVATION_STATISTICS = ("mean_abs", "max_abs", "std", "kurtosis")


@torch.no_grad()
def linear_statistics(context: BitContext) -> dict[str, dict[str, float]]:
    """Per linear: its inputs' mean |x|, max |x|, std and kurtosis (from the Profile) and its weight's std and
    max |w|; AutoMP-RL's state and the report's per-layer statistics view."""
    profile = context.calibration.profile()
    statistics = {}
    for name, linear in context.linears.items():
        summary = profile.units[name].summary()
        weight = linear.weight.float()
        statistics[name] = {**{key: float(summary[key]) for key in ACTIVATION_STATISTICS},
                            "weight_std": float(weight.std()), "weight_max_abs": float(weight.abs().max())}
    return statistics


def average_bits(sizes: dict[str, int], bits: dict[str, int]) -> float:
    """Parameter-weighted mean bit width of own-grid widths (``BitContext.average_bits`` for any level set)."""
    return sum(sizes[u] * bits[u] for u in sizes) / sum(sizes.values())


BitAllocator = Callable[..., BitAllocation]
BIT_ALLOCATORS: Registry[BitAllocator] = Registry("bit allocator")


def check_bit_budget(context: BitContext, avg_bits: float | None) -> None:
    if avg_bits is None:
        return
    narrowest = context.average_bits({name: context.options(name)[0] for name in context.linears})
    if avg_bits < narrowest - 1e-9:
        raise BudgetError(f"--avg-bits {avg_bits} is below the smallest average these types reach, {narrowest:.4g} "
                          f"bits per weight as stored (every linear at its narrowest); raise it to at least "
                          f"{narrowest:.4g}.")


@BIT_ALLOCATORS.register("uniform")
def uniform_bits(context: BitContext, avg_bits: float | None = None) -> BitAllocation:
    """Every linear at the same level: the widest choice whose stored average fits ``avg_bits`` (or the only
    choice given)."""
    check_bit_budget(context, avg_bits)
    if avg_bits is None and len(context.choices) != 1:
        raise BudgetError("Uniform quantization needs one --bits value, or --avg-bits to pick one.")
    for level in reversed(context.choices):
        assignment = {name: context.stored(name, level) for name in context.linears}
        if avg_bits is None or context.average_bits(assignment) <= avg_bits + 1e-9:
            return BitAllocation(assignment)
    raise BudgetError(f"No single level fits --avg-bits {avg_bits}.")


Sensitivity = Callable[..., dict[str, dict[Level, float]]]
SENSITIVITIES: Registry[Sensitivity] = Registry("bit sensitivity")


def sensitivities(context: BitContext, metric: str = "kl") -> dict[str, dict[Level, float]]:
    """Sensitivity of every linear at every bit choice by ``metric`` (``SENSITIVITIES``), computed once per
    context (AutoMP-RL's seeds and its budget projection share it)."""
    key = (SENSITIVITIES.canonical(metric),)
    if key not in context._sensitivities:
        context._sensitivities[key] = SENSITIVITIES.get(metric)(context)
    return context._sensitivities[key]


@SENSITIVITIES.register("error")
def error_sensitivity(context: BitContext) -> dict[str, dict[Level, float]]:
    """Activation-weighted rounding output error of each linear at each level (``quantization_error``)."""
    profile = context.calibration.profile()
    return {name: {level: quantization_error(linear, profile.feature_norms(name), context.round_trip(name, level))
                   for level in context.options(name)}
            for name, linear in context.linears.items()}


SENSITIVITY_SAMPLES, SENSITIVITY_SEQLEN, SENSITIVITY_VERSION = 4, 128, 2


class _Divergence:
    """Mean KL(dense ‖ rounded) of the next-token distributions, against the dense log-probabilities."""

    def __init__(self, dense_logits: list[torch.Tensor]) -> None:
        self.dense = [torch.log_softmax(logits.float(), -1) for logits in dense_logits]

    def __call__(self, logits: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for reference, current in zip(self.dense, logits):
            log_q = torch.log_softmax(current.float(), -1)
            total += float((reference.exp() * (reference - log_q)).sum())
            count += reference.shape[0] * reference.shape[1]
        return total / count


class _NllIncrease:
    """ln PPL(rounded) − ln PPL(dense): the mean next-token NLL increase."""

    def __init__(self, dense_logits: list[torch.Tensor], batches: list[torch.Tensor]) -> None:
        self.base = self.nll(dense_logits, batches)

    @staticmethod
    def nll(logits: list[torch.Tensor], batches: list[torch.Tensor]) -> float:

        pairs = [next_token_nll(chunk, ids) for chunk, ids in zip(logits, batches)]
        return sum(n for n, _ in pairs) / sum(c for _, c in pairs)

    def __call__(self, logits: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
        return self.nll(logits, batches) - self.base


def _measured_sensitivity(context: BitContext, metric: str) -> dict[str, dict[Level, float]]:
    """``metric`` of the model with only one linear rounded to each level, on the first 4 × 128 calibration
    tokens. Each candidate reruns only the sublayers from its own on (stored states before it); lossless levels
    (own 8-bit, GGUF f16) are taken as 0 rather than measured. Cached on disk per model, tokens and
    quantization settings, every level measured so far kept."""

    tokens = context.calibration.tokens()[:SENSITIVITY_SAMPLES, :SENSITIVITY_SEQLEN]
    key = stable_hash({"model": model_fingerprint(context.model), "tokens": tokens.tolist(), "metric": metric,
                       **({"activation_rounding": True} if context.activation_rounding else {}),
                       "units": list(context.linears), "levels": {k: v for k, v in context.levels.describe().items()
                                                                   if k != "choices"},
                       "group_size": context.group_size, "symmetric": context.symmetric,
                       "version": SENSITIVITY_VERSION}, length=24)
    path = cache_dir("sensitivity") / f"{key}.json"
    parse = context.levels.parse
    result = {name: {parse(b): v for b, v in values.items()} for name, values in (read_json(path) or {}).items()}
    missing = {name: [level for level in context.options(name)
                      if not context.levels.lossless(level) and level not in result.get(name, {})]
               for name in context.linears}
    if any(missing.values()):
        _measure(context, tokens, missing, metric, result)
        atomic_write_json(path, {name: {str(b): v for b, v in values.items()} for name, values in result.items()})
    return {name: {level: 0.0 if context.levels.lossless(level) else result[name][level]
                   for level in context.options(name)} for name in context.linears}


@torch.no_grad()
def _measure(context: BitContext, tokens: torch.Tensor, missing: dict[str, list[Level]], metric: str,
             result: dict[str, dict[Level, float]]) -> None:

    batch_size = context.calibration.settings.calib_batch_size
    stream = SublayerStream(context.model, tokens, batch_size, num_checkpoints=2 * len(find_blocks(context.model)[1]))
    batches = list(tokens.split(batch_size))
    dense_logits = stream.logits_from(0)
    score = _Divergence(dense_logits) if metric == "kl" else _NllIncrease(dense_logits, batches)
    del dense_logits
    todo = {name: levels for name, levels in missing.items() if levels}
    with context.rounding() as hooks:
        for name, levels in tqdm(todo.items(), desc=f"bit sensitivity ({metric}, {len(todo)} linears)",
                                 unit="linear", disable=None, leave=False):
            linear = context.linears[name]
            position = stream.position_of(name.rsplit(".", 1)[0])
            dense = linear.weight.data
            rounded = {level: context.round_trip(name, level).to(dense.dtype) for level in levels}  # from dense
            try:
                for level, weight in rounded.items():
                    linear.weight.data = weight
                    if hooks is not None:
                        hooks.levels[name] = level
                    result.setdefault(name, {})[level] = score(stream.logits_from(position), batches)
            finally:
                linear.weight.data = dense
                if hooks is not None:
                    hooks.levels[name] = None


@SENSITIVITIES.register("kl")
def kl_sensitivity(context: BitContext) -> dict[str, dict[Level, float]]:
    """Mean KL divergence of the next-token distribution from the dense model's with only this linear rounded:
    never negative and far steadier on a few hundred tokens than the NLL difference."""
    return _measured_sensitivity(context, "kl")


@SENSITIVITIES.register("ppl")
def perplexity_sensitivity(context: BitContext) -> dict[str, dict[Level, float]]:
    """ln PPL(only this linear rounded) − ln PPL(dense): the quantity itself, but on 512 tokens a layer's
    effect is often below the tokens' own scatter (many come out negative)."""
    return _measured_sensitivity(context, "ppl")


def fit_bits(bits: dict[str, Level], context: BitContext, errors: dict[str, dict[Level, float]],
             budget_bits: float) -> dict[str, Level]:
    """Project ``bits`` onto a budget of ``budget_bits`` stored bits: narrow the linear whose error grows least
    per bit saved until the total fits, then widen where it helps most per bit while it still fits."""
    cost = {name: {level: context.bits(name, level) for level in context.options(name)} for name in bits}
    options = {name: pareto_levels(cost[name], errors[name]) for name in bits}
    # a level off the front (another costs no more and errs no more) gives way to the cheapest that errs no more
    bits = {name: min((lv for lv in options[name] if errors[name][lv] <= errors[name][context.stored(name, level)]),
                      key=lambda lv: cost[name][lv]) for name, level in bits.items()}
    used = sum(cost[name][bits[name]] for name in bits)
    while used > budget_bits + 1e-6:
        best, best_rate = None, float("inf")
        for name, level in bits.items():
            position = options[name].index(level)
            if position == 0:
                continue
            lower = options[name][position - 1]
            rate = (errors[name][lower] - errors[name][level]) / (cost[name][level] - cost[name][lower])
            if rate < best_rate:
                best, best_rate = name, rate
        if best is None:
            raise BudgetError("The bit budget is below every linear's narrowest level.")
        narrower = options[best][options[best].index(bits[best]) - 1]
        used -= cost[best][bits[best]] - cost[best][narrower]
        bits[best] = narrower
    while True:
        steps = []
        for name, level in bits.items():
            position = options[name].index(level)
            if position + 1 < len(options[name]):
                wider = options[name][position + 1]
                extra = cost[name][wider] - cost[name][level]
                if used + extra <= budget_bits + 1e-6:
                    steps.append(((errors[name][level] - errors[name][wider]) / extra, name, wider, extra))
        if not steps:
            return bits
        _, name, wider, extra = max(steps, key=lambda step: step[0])
        used += extra
        bits[name] = wider


def pareto_levels(cost: dict[Level, float], error: dict[Level, float]) -> list[Level]:
    """The levels no other level beats on both storage and error, cheapest first (GGUF types of equal size,
    q4_k and q4_0, keep only the better one)."""
    front: list[Level] = []
    for level in sorted(cost, key=lambda lv: (cost[lv], error[lv])):
        if not front or (error[level] < error[front[-1]] and cost[level] > cost[front[-1]]):
            front.append(level)
    return front


@torch.no_grad()
def quantization_error(linear: nn.Linear, norms: torch.Tensor, rounded: torch.Tensor) -> float:
    """Σ_j ‖X_j‖²·‖W_:j − Ŵ_:j‖²: the output error of the rounded weight under a diagonal Hessian."""
    weight = linear.weight.float()
    error = rounded.float() - weight
    return float((error.pow(2).sum(0) * norms.float().pow(2)).sum())


def budget_bits(context: BitContext, avg_bits: float | None, max_bits: float | None = None) -> float | None:
    """The tighter of ``avg_bits`` (per weight) and ``max_bits`` (total stored bits of the linears)."""
    limits = [b for b in (avg_bits * sum(context.sizes().values()) if avg_bits is not None else None, max_bits)
              if b is not None]
    return min(limits) if limits else None


class SensitivityOptions(ComponentOptions):
    """The per-linear sensitivity the bit searches rank by."""

    sensitivity: Optional[str] = option("greedy / automp-rl: per-linear sensitivity with only that linear rounded: "
                                        "kl (default: output KL divergence from dense), ppl (ln PPL increase) or error "
                                        "(activation-weighted RTN error, no forward passes).")


@declares(SensitivityOptions)
@BIT_ALLOCATORS.register("greedy")
def greedy_bits(context: BitContext, avg_bits: float | None = None, sensitivity: str = "kl",
                max_bits: float | None = None) -> BitAllocation:
    """Narrow the linear with the least sensitivity increase per bit saved until the budget fits."""
    budget = budget_bits(context, avg_bits, max_bits)
    if budget is None:
        raise BudgetError("The greedy bit allocator needs --avg-bits or --max-bytes.")
    check_bit_budget(context, avg_bits)
    errors = sensitivities(context, sensitivity)
    bits = fit_bits({name: context.options(name)[-1] for name in context.linears}, context, errors, budget)
    return BitAllocation(bits, {"avg_bits": avg_bits, "sensitivity": sensitivity},
                         {"sensitivity": {name: {str(b): e for b, e in errs.items()} for name, errs in errors.items()}})
