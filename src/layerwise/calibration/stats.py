"""Per-linear input statistics accumulated by forward hooks: feature norms (Wanda, OWL) and moments."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .shared_input import per_input_memo


@dataclass
class InputStats:
    """Running sums over every calibration token entering one linear (float64 accumulators)."""

    sum_sq: torch.Tensor  # [in_features], Σ x_j²
    tokens: int = 0
    count: int = 0  # elements seen (tokens × in_features)
    total: float = 0.0
    total_sq: float = 0.0
    total_cube: float = 0.0
    total_quad: float = 0.0
    total_abs: float = 0.0
    max_abs: float = 0.0

    @classmethod
    def empty(cls, in_features: int) -> "InputStats":
        return cls(sum_sq=torch.zeros(in_features, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        self.add(batch_moments(x))

    def add(self, moments: "BatchMoments") -> None:
        """Fold one batch's moments into the running sums (float64)."""
        self.sum_sq += moments.sum_sq
        self.tokens += moments.tokens
        self.count += moments.count
        self.total += moments.total
        self.total_sq += float(moments.sum_sq.sum())
        self.total_cube += moments.total_cube
        self.total_quad += moments.total_quad
        self.total_abs += moments.total_abs
        self.max_abs = max(self.max_abs, moments.max_abs)

    def feature_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens, per input feature (Wanda's activation norm)."""
        return self.sum_sq.sqrt()

    def summary(self) -> dict[str, float]:
        """Mean |x|, max |x|, mean, std and kurtosis of all inputs (AutoMP-style state features)."""
        n = max(1, self.count)
        mean = self.total / n
        var = max(self.total_sq / n - mean**2, 1e-30)
        fourth = self.total_quad / n - 4 * mean * self.total_cube / n + 6 * mean**2 * self.total_sq / n - 3 * mean**4
        return {
            "mean_abs": self.total_abs / n,
            "max_abs": self.max_abs,
            "mean": mean,
            "std": math.sqrt(var),
            "kurtosis": fourth / var**2,
        }


@dataclass
class BatchMoments:
    """Sums over one batch of inputs, computed in float32 (per-batch sums are short; torch's reductions and BLAS
    dot products sum in blocks, so their error stays near float32's 1e-7 relative) and folded into float64."""

    sum_sq: torch.Tensor
    tokens: int
    count: int
    total: float
    total_cube: float
    total_quad: float
    total_abs: float
    max_abs: float


@torch.no_grad()
def batch_moments(x: torch.Tensor) -> BatchMoments:
    """One pass of elementwise work (the squares); every other moment is a reduction or a dot product over
    tensors that already exist, so the statistics cost little beside the block's own matrix products."""
    x = x.reshape(-1, x.shape[-1]).float()
    flat = x.reshape(-1)
    squared = flat * flat
    return BatchMoments(
        sum_sq=squared.view_as(x).sum(0).double().cpu(),
        tokens=x.shape[0],
        count=x.numel(),
        total=float(flat.sum()),
        total_cube=float(torch.dot(squared, flat)),
        total_quad=float(torch.dot(squared, squared)),
        total_abs=float(torch.linalg.vector_norm(flat, 1)),
        max_abs=float(torch.linalg.vector_norm(flat, float("inf"))),
    )


def attach_input_stats(linears: dict[str, nn.Linear], stats: dict[str, InputStats]) -> list:
    """Forward pre-hooks adding each linear's inputs into ``stats[name]``; returns the handles to remove (pre-hooks:
    the statistics are taken before the linear runs, so a pass may stop there, see ``BlockwiseRunner.feed``).

    Linears fed the same tensor (q/k/v, gate/up) share one moment computation per forward.
    """
    shared_moments = per_input_memo(batch_moments)
    handles = []
    for name, linear in linears.items():
        stats.setdefault(name, InputStats.empty(linear.in_features))
        handles.append(
            linear.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(shared_moments(args[0])))
        )
    return handles
