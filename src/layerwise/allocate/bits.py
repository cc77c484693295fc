"""Bit allocation: which bit width each decoder linear is stored at. The budget is a parameter-weighted
average bit width (``avg_bits``) over the decoder linears; every allocator's plan stays at or under it.

- ``uniform``: one width everywhere (the largest choice within the budget, or ``bits`` when unbudgeted);
- ``greedy``: start every linear at the widest choice and repeatedly narrow the one whose quantization
  error grows least per bit saved (error weighted by the Profile's input norms: Σ_j ‖X_j‖²·‖W_:j − Ŵ_:j‖²),
  until the average fits the budget, then widen again wherever the remainder still allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import BudgetError
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

    def sizes(self) -> dict[str, int]:
        return {name: linear.weight.numel() for name, linear in self.linears.items()}


@dataclass
class BitAllocation:
    bits: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


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


def sensitivities(context: BitContext) -> dict[str, dict[int, float]]:
    """Activation-weighted RTN error of every linear at every bit choice (see ``quantization_error``)."""
    profile = context.calibration.profile()
    return {name: {b: quantization_error(linear, profile.feature_norms(name), b, context.group_size, context.symmetric)
                   for b in context.choices}
            for name, linear in context.linears.items()}


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
    from ..backends.quantize import rtn_round_trip

    weight = linear.weight.float()
    error = rtn_round_trip(weight, bits, group_size, symmetric) - weight
    return float((error.pow(2).sum(0) * norms.float().pow(2)).sum())


@BIT_ALLOCATORS.register("greedy")
def greedy_bits(context: BitContext, avg_bits: float | None = None) -> BitAllocation:
    """Narrow the linear with the least error increase per bit saved until the average fits ``avg_bits``."""
    if avg_bits is None:
        raise BudgetError("The greedy bit allocator needs --avg-bits.")
    check_bit_budget(context, avg_bits)
    choices = sorted(context.choices)
    sizes = context.sizes()
    errors = sensitivities(context)
    bits = fit_bits({name: choices[-1] for name in context.linears}, sizes, errors, choices, avg_bits)
    return BitAllocation(bits, {"avg_bits": avg_bits},
                         {"sensitivity": {name: {str(b): e for b, e in errs.items()} for name, errs in errors.items()}})
