"""Exact-count pruning by score: whole matrix, per output row, or N:M groups; ties broken by position."""

from __future__ import annotations

import torch

from ..errors import PlanError


def count_for(ratio: float, numel: int) -> int:
    """Number of weights a ratio removes; plans store ratios as k / n so this recovers k exactly."""
    return int(round(ratio * numel))


def prune_lowest(weight: torch.Tensor, scores: torch.Tensor, count: int) -> None:
    """Zero, in place, the ``count`` entries of ``weight`` with the lowest ``scores`` (whole matrix)."""
    if count <= 0:
        return
    order = torch.argsort(scores.reshape(-1), stable=True)
    weight.view(-1)[order[:count]] = 0


def prune_lowest_per_row(weight: torch.Tensor, scores: torch.Tensor, count: int) -> None:
    """Zero the lowest-scoring weights of every output row, ``count`` in all, spread evenly over rows
    (the first ``count % rows`` rows take one more)."""
    if count <= 0:
        return
    rows, cols = weight.shape
    base, extra = divmod(count, rows)
    order = torch.argsort(scores, dim=1, stable=True)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask.scatter_(1, order[:, :base], True)
    mask[:extra].scatter_(1, order[:extra, base : base + 1], True)
    weight[mask] = 0


def check_nm(pattern: tuple[int, int], in_features: int, unit: str) -> None:
    n, m = pattern
    if not 0 < n < m or in_features % m:
        raise PlanError(f"N:M pattern {n}:{m} does not fit {unit} (input width {in_features}).")


def prune_nm(weight: torch.Tensor, scores: torch.Tensor, pattern: tuple[int, int]) -> None:
    """Zero the ``n`` lowest-scoring weights in every group of ``m`` consecutive inputs of each row."""
    n, m = pattern
    rows, cols = weight.shape
    grouped = scores.reshape(rows, cols // m, m)
    lowest = torch.topk(grouped, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, lowest, True)
    weight[mask.reshape(rows, cols)] = 0
