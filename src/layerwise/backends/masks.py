"""Exact-count pruning by score: zero exactly k weights, with ties broken deterministically."""

from __future__ import annotations

import torch


def prune_lowest(weight: torch.Tensor, scores: torch.Tensor, count: int) -> None:
    """Zero, in place, the ``count`` entries of ``weight`` with the lowest ``scores`` (whole matrix)."""
    if count <= 0:
        return
    order = torch.argsort(scores.reshape(-1), stable=True)
    weight.view(-1)[order[:count]] = 0


def count_for(ratio: float, numel: int) -> int:
    """Number of weights a ratio removes; plans store ratios as k / n so this recovers k exactly."""
    return int(round(ratio * numel))
