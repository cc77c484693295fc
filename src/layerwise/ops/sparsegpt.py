"""SparseGPT: OBS-style pruning with weight updates, column block by column block, calibrated
sequentially so every block sees the outputs of the already-pruned blocks before it."""

from __future__ import annotations

import torch
from torch import nn

from .base import ApplyContext, sequential_hessian_pass
from .masks import check_nm, count_for
from .unstructured import SPARSIFIERS, SparsifyAction

BLOCK_SIZE = 128
DAMPENING = 0.01


def inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, dampening: float = DAMPENING) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after dampening (dead inputs get H_jj = 1 and zero weights)."""
    hessian = hessian.clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian.diagonal().add_(dampening * torch.mean(torch.diag(hessian)))
    factor = torch.linalg.cholesky(hessian)
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, count: int, pattern: tuple[int, int] | None = None,
                    block_size: int = BLOCK_SIZE, dampening: float = DAMPENING) -> None:
    """Prune ``weight`` in place to exactly ``count`` zeros (or an N:M pattern), compensating the rest."""
    dtype = weight.dtype
    w = weight.float().clone()
    hinv = inverse_hessian_factor(hessian.float(), w, dampening)
    columns = w.shape[1]
    starts = list(range(0, columns, block_size))
    block_counts = _split_by_width(count, [min(s + block_size, columns) - s for s in starts])
    for start, block_count in zip(starts, block_counts):
        end = min(start + block_size, columns)
        w1 = w[:, start:end].clone()
        hinv1 = hinv[start:end, start:end]
        diag = torch.diag(hinv1)
        errors = torch.zeros_like(w1)
        mask = torch.zeros_like(w1, dtype=torch.bool)
        if pattern is None and block_count:
            scores = (w1**2 / diag[None, :] ** 2).reshape(-1)
            mask.view(-1)[torch.argsort(scores, stable=True)[:block_count]] = True
        for i in range(end - start):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                scores = w1[:, i : i + m] ** 2 / diag[i : i + m][None, :] ** 2
                mask.scatter_(1, i + torch.topk(scores, n, dim=1, largest=False).indices, True)
            column = w1[:, i]
            kept = torch.where(mask[:, i], torch.zeros_like(column), column)
            error = (column - kept) / hinv1[i, i]
            w1[:, i:] -= error[:, None] @ hinv1[i, i:][None, :]
            w1[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = w1
        w[:, end:] -= errors @ hinv[start:end, end:]
    weight.copy_(w.to(dtype))


def _split_by_width(count: int, widths: list[int]) -> list[int]:
    """Distribute ``count`` over column blocks in proportion to their widths, summing exactly."""
    total = sum(widths)
    raw = [count * w / total for w in widths]
    counts = [int(r) for r in raw]
    for index in sorted(range(len(widths)), key=lambda i: raw[i] - counts[i], reverse=True)[: count - sum(counts)]:
        counts[index] += 1
    return counts


@SPARSIFIERS.register("sparsegpt")
def sparsegpt(model: nn.Module, actions: list[SparsifyAction], context: ApplyContext) -> None:
    """Sequential SparseGPT over the calibration windows (block size 128, dampening 0.01 of mean diag H)."""

    def prune(linear: nn.Module, action: SparsifyAction, hessian: torch.Tensor) -> None:
        pattern = action.nm()
        if pattern is not None:
            check_nm(pattern, linear.in_features, action.unit)
        sparsegpt_prune(linear.weight.data, hessian, count_for(action.ratio, linear.weight.numel()), pattern)

    sequential_hessian_pass(model, actions, context, "sparsegpt", prune)
