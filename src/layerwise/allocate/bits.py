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

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..backends.quantize import rtn_round_trip
from ..errors import BudgetError
from ..models.discovery import find_blocks
from ..registry import Registry


@dataclass
class BitContext:
    """What a bit allocator reads: the decoder linears, the quantization settings and the calibration."""

    model: nn.Module
    linears: dict[str, nn.Linear]
    choices: list[int]
    group_size: int | None
    symmetric: bool
    calibration: Any = None
    seed: int = 0
    _sensitivities: dict[tuple, dict[str, dict[int, float]]] = field(default_factory=dict, repr=False)

    def sizes(self) -> dict[str, int]:
        return {name: linear.weight.numel() for name, linear in self.linears.items()}


@dataclass
class BitAllocation:
    bits: dict[str, int]
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
    """Parameter-weighted mean bit width."""
    return sum(sizes[u] * bits[u] for u in sizes) / sum(sizes.values())


BitAllocator = Callable[..., BitAllocation]
BIT_ALLOCATORS: Registry[BitAllocator] = Registry("bit allocator")


def check_bit_budget(context: BitContext, avg_bits: float | None) -> None:
    if avg_bits is not None and avg_bits < min(context.choices):
        raise BudgetError(f"--avg-bits {avg_bits} is below the narrowest choice ({min(context.choices)} bits).")


@BIT_ALLOCATORS.register("uniform")
def uniform_bits(context: BitContext, avg_bits: float | None = None) -> BitAllocation:
    """Every linear at the same width: the widest choice within ``avg_bits`` (or the only choice given)."""
    check_bit_budget(context, avg_bits)
    if avg_bits is None and len(context.choices) != 1:
        raise BudgetError("Uniform quantization needs one --bits value, or --avg-bits to pick one.")
    width = max(b for b in context.choices if avg_bits is None or b <= avg_bits + 1e-9)
    return BitAllocation({name: width for name in context.linears})


Sensitivity = Callable[..., dict[str, dict[int, float]]]
SENSITIVITIES: Registry[Sensitivity] = Registry("bit sensitivity")


def sensitivities(context: BitContext, metric: str = "kl") -> dict[str, dict[int, float]]:
    """Sensitivity of every linear at every bit choice by ``metric`` (``SENSITIVITIES``), computed once per
    context (AutoMP-RL's seeds and its budget projection share it)."""
    key = (SENSITIVITIES.canonical(metric),)
    if key not in context._sensitivities:
        context._sensitivities[key] = SENSITIVITIES.get(metric)(context)
    return context._sensitivities[key]


@SENSITIVITIES.register("error")
def error_sensitivity(context: BitContext) -> dict[str, dict[int, float]]:
    """Activation-weighted RTN output error of each linear at each width (``quantization_error``)."""
    profile = context.calibration.profile()
    return {name: {b: quantization_error(linear, profile.feature_norms(name), b, context.group_size, context.symmetric)
                   for b in context.choices}
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
        from ..evaluate.perplexity import next_token_nll

        pairs = [next_token_nll(chunk, ids) for chunk, ids in zip(logits, batches)]
        return sum(n for n, _ in pairs) / sum(c for _, c in pairs)

    def __call__(self, logits: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
        return self.nll(logits, batches) - self.base


def _measured_sensitivity(context: BitContext, metric: str) -> dict[str, dict[int, float]]:
    """``metric`` of the model with only one linear rounded to each width, on the first 4 × 128 calibration
    tokens. Each candidate reruns only the sublayers from its own on (stored states before it); 8-bit rounding
    is taken as lossless (0) rather than measured. Cached on disk per model, tokens and quantization settings,
    every width measured so far kept."""
    from ..cache import atomic_write_json, cache_dir, read_json, stable_hash
    from ..models.fingerprint import model_fingerprint

    tokens = context.calibration.tokens()[:SENSITIVITY_SAMPLES, :SENSITIVITY_SEQLEN]
    key = stable_hash({"model": model_fingerprint(context.model), "tokens": tokens.tolist(), "metric": metric,
                       "units": list(context.linears), "group_size": context.group_size,
                       "symmetric": context.symmetric, "version": SENSITIVITY_VERSION}, length=24)
    path = cache_dir("sensitivity") / f"{key}.json"
    result = {name: {int(b): v for b, v in values.items()} for name, values in (read_json(path) or {}).items()}
    missing = sorted({b for b in context.choices if b < 8 and any(b not in result.get(n, {}) for n in context.linears)})
    if missing:
        _measure(context, tokens, missing, metric, result)
        atomic_write_json(path, result)
    return {name: {b: 0.0 if b >= 8 else result[name][b] for b in context.choices} for name in context.linears}


@torch.no_grad()
def _measure(context: BitContext, tokens: torch.Tensor, widths: list[int], metric: str,
             result: dict[str, dict[int, float]]) -> None:
    from ..profile.sublayers import SublayerStream

    batch_size = context.calibration.settings.calib_batch_size
    stream = SublayerStream(context.model, tokens, batch_size, num_checkpoints=2 * len(find_blocks(context.model)[1]))
    batches = list(tokens.split(batch_size))
    dense_logits = stream.logits_from(0)
    score = _Divergence(dense_logits) if metric == "kl" else _NllIncrease(dense_logits, batches)
    del dense_logits
    for name, linear in tqdm(context.linears.items(), desc=f"bit sensitivity ({metric})", unit="linear",
                             disable=None, leave=False):
        position = stream.position_of(name.rsplit(".", 1)[0])
        dense = linear.weight.data
        try:
            for bits in widths:
                linear.weight.data = rtn_round_trip(dense, bits, context.group_size, context.symmetric).to(dense.dtype)
                result.setdefault(name, {})[bits] = score(stream.logits_from(position), batches)
        finally:
            linear.weight.data = dense


@SENSITIVITIES.register("kl")
def kl_sensitivity(context: BitContext) -> dict[str, dict[int, float]]:
    """Mean KL divergence of the next-token distribution from the dense model's with only this linear rounded:
    never negative and far steadier on a few hundred tokens than the NLL difference."""
    return _measured_sensitivity(context, "kl")


@SENSITIVITIES.register("ppl")
def perplexity_sensitivity(context: BitContext) -> dict[str, dict[int, float]]:
    """ln PPL(only this linear rounded) − ln PPL(dense): the quantity itself, but on 512 tokens a layer's
    effect is often below the tokens' own scatter (many come out negative)."""
    return _measured_sensitivity(context, "ppl")


def fit_bits(bits: dict[str, int], sizes: dict[str, int], errors: dict[str, dict[int, float]], choices: list[int],
             avg_bits: float) -> dict[str, int]:
    """Project ``bits`` onto the budget: narrow the linear whose error grows least per bit saved until the
    average fits ``avg_bits``, then widen where it helps most per bit while it still fits."""
    choices = sorted(choices)
    bits = dict(bits)
    budget = avg_bits * sum(sizes.values())
    used = sum(sizes[u] * bits[u] for u in bits)
    while used > budget + 1e-6:
        best, best_cost = None, float("inf")
        for name, width in bits.items():
            lower = [b for b in choices if b < width]
            if not lower:
                continue
            cost = (errors[name][lower[-1]] - errors[name][width]) / (sizes[name] * (width - lower[-1]))
            if cost < best_cost:
                best, best_cost = name, cost
        narrower = [b for b in choices if b < bits[best]][-1]
        used -= sizes[best] * (bits[best] - narrower)
        bits[best] = narrower
    while True:
        options = [(name, [b for b in choices if b > width][0]) for name, width in bits.items() if width < choices[-1]]
        options = [(n, w) for n, w in options if used + sizes[n] * (w - bits[n]) <= budget + 1e-6]
        if not options:
            return bits
        name, wider = max(options, key=lambda o: (errors[o[0]][bits[o[0]]] - errors[o[0]][o[1]])
                          / (sizes[o[0]] * (o[1] - bits[o[0]])))
        used += sizes[name] * (wider - bits[name])
        bits[name] = wider


@torch.no_grad()
def quantization_error(linear: nn.Linear, norms: torch.Tensor, bits: int, group_size: int | None,
                       symmetric: bool) -> float:
    """Σ_j ‖X_j‖²·‖W_:j − Ŵ_:j‖²: the output error of round-to-nearest at ``bits`` under a diagonal Hessian."""
    weight = linear.weight.float()
    error = rtn_round_trip(weight, bits, group_size, symmetric) - weight
    return float((error.pow(2).sum(0) * norms.float().pow(2)).sum())


@BIT_ALLOCATORS.register("greedy")
def greedy_bits(context: BitContext, avg_bits: float | None = None, sensitivity: str = "kl") -> BitAllocation:
    """Narrow the linear with the least sensitivity increase per bit saved until the average fits ``avg_bits``."""
    if avg_bits is None:
        raise BudgetError("The greedy bit allocator needs --avg-bits.")
    check_bit_budget(context, avg_bits)
    choices = sorted(context.choices)
    sizes = context.sizes()
    errors = sensitivities(context, sensitivity)
    bits = fit_bits({name: choices[-1] for name in context.linears}, sizes, errors, choices, avg_bits)
    return BitAllocation(bits, {"avg_bits": avg_bits, "sensitivity": sensitivity},
                         {"sensitivity": {name: {str(b): e for b, e in errs.items()} for name, errs in errors.items()}})
