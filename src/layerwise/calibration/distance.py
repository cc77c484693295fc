"""How far a pruned model's activations are from the reference: the sensitivity metrics of depth pruning."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..registry import Registry

# (reference, pruned) [batch, tokens, hidden] -> one distance per sequence [batch]
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DISTANCES: Registry[Distance] = Registry("distance metric")


@DISTANCES.register("l2-token")
def l2_token(reference: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the L2 distance between hidden vectors."""
    return (reference.float() - pruned.float()).norm(dim=-1).mean(dim=-1)


@DISTANCES.register("l2-sentence")
def l2_sentence(reference: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """L2 distance between whole sequences (all tokens' hidden vectors flattened)."""
    return (reference.float() - pruned.float()).flatten(1).norm(dim=-1)


@DISTANCES.register("cosine-token")
def cosine_token(reference: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cosine similarity."""
    return (1 - F.cosine_similarity(reference.float(), pruned.float(), dim=-1)).mean(dim=-1)


@DISTANCES.register("cosine-sentence")
def cosine_sentence(reference: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of whole flattened sequences."""
    return 1 - F.cosine_similarity(reference.float().flatten(1), pruned.float().flatten(1), dim=-1)


def mean_distance(metric: str, references: list[torch.Tensor], pruned: list[torch.Tensor],
                  normalize: bool = False) -> float:
    """Mean of ``metric`` over all calibration sequences; ``normalize`` divides L2 metrics by the
    reference's own norm (same reduction), so the score is relative."""
    distance = DISTANCES.get(metric)
    values, norms = [], []
    for ref, out in zip(references, pruned):
        values.append(distance(ref, out))
        if normalize and metric.startswith("l2"):
            norms.append(distance(ref, torch.zeros_like(ref)))
    total = torch.cat(values).mean()
    if norms:
        total = total / torch.cat(norms).mean().clamp_min(1e-12)
    return float(total)
