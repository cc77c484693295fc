"""SPRINT's in-compression tuning: after a sublayer is removed, refit part of the next MLP's output projection
by least squares so that MLP's output matches the unpruned model's again.

With ``X`` the pruned model's inputs to ``down_proj``, ``R`` the residual stream entering that MLP and ``Y``
the unpruned stream leaving it, the MLP should give ``Y - R = X Wᵀ``. Two ways to choose what is refitted,
as SPRINT's code offers them (``direction``):

- ``in_channel`` (the default here): the input columns with the largest Σ_out |W|·‖X_col‖, the other
  columns held fixed (their contribution is subtracted from the target, which the reference omits):
  ``min ‖(Y - R - X₋ W₋ᵀ) - X_S W_Sᵀ‖²``;
- ``out_channel`` (the reference's default): the ``ratio`` share of output rows with the largest
  Σ_in |W|·‖X_col‖, each refitted over every input: ``min ‖(Y - R)_S - X W_Sᵀ‖²``.

Damping pulls the refit towards the original weights ``w⁰``: relative (the default here), a ridge whose
strength is ``c`` times the mean diagonal of XᵀX; or absolute as in the reference, the normal equations
``G w = b`` stacked over ``c·I w = c·w⁰`` and solved by least squares (``min ‖G w - b‖² + c²‖w - w⁰‖²``).
Everything comes from the Gram statistics (no activations kept).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..calibration.sublayers import States, SublayerStream
from ..errors import UnsupportedArchitectureError
from ..models.swaps import SwapLog


@dataclass
class ProjectionStats:
    """Sufficient statistics of the least-squares problem, accumulated over calibration batches."""

    gram: torch.Tensor  # Σ Xᵀ X          [d_in, d_in]
    cross: torch.Tensor  # Σ Xᵀ (Y - R)    [d_in, d_out]
    target_sq: float  # Σ ‖Y - R‖²
    rows: int

    @classmethod
    def empty(cls, d_in: int, d_out: int, device: torch.device) -> "ProjectionStats":
        zeros = torch.zeros
        return cls(zeros(d_in, d_in, dtype=torch.float64, device=device),
                   zeros(d_in, d_out, dtype=torch.float64, device=device), 0.0, 0)

    def add(self, inputs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``inputs`` to the projection [.., d_in], ``target`` = Y - R [.., d_out]."""
        x = inputs.reshape(-1, inputs.shape[-1]).double()
        t = target.reshape(-1, target.shape[-1]).double()
        self.gram += x.T @ x
        self.cross += x.T @ t
        self.target_sq += float((t * t).sum())
        self.rows += x.shape[0]


def projection_error(weight: torch.Tensor, stats: ProjectionStats) -> float:
    """‖Y - R - X Wᵀ‖² summed over the calibration tokens, from the statistics."""
    w = weight.double()
    return stats.target_sq - 2 * float((w * stats.cross.T).sum()) + float(((w @ stats.gram) * w).sum())


def _channel_scores(weight: torch.Tensor, stats: ProjectionStats, dim: int) -> torch.Tensor:
    """SPRINT's channel score, |W|·‖X_col‖ summed along ``dim`` (0: per input column, 1: per output row)."""
    return (weight.abs().double() * stats.gram.diagonal().clamp_min(0).sqrt()).sum(dim=dim)


def _top(score: torch.Tensor, ratio: float) -> torch.Tensor:
    count = max(1, min(score.numel(), round(ratio * score.numel())))
    return score.topk(count).indices.sort().values


def _damped_solve(gram: torch.Tensor, rhs: torch.Tensor, start: torch.Tensor, damping: float,
                  relative: bool) -> torch.Tensor:
    """Solve ``gram · w = rhs`` pulled towards ``start`` (all [k, ·]); see the module docstring."""
    if damping <= 0:
        return torch.linalg.lstsq(gram, rhs).solution
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    if relative:
        lam = damping * float(gram.diagonal().mean())
        return torch.linalg.lstsq(gram + lam * eye, rhs + lam * start).solution
    return torch.linalg.lstsq(torch.cat([gram, damping * eye]), torch.cat([rhs, damping * start])).solution


def _fit_rows(weight: torch.Tensor, stats: ProjectionStats, rows: torch.Tensor, damping: float,
              relative: bool) -> torch.Tensor:
    """Refitted ``weight[rows, :]`` over every input column."""
    w = weight.double()
    return _damped_solve(stats.gram, stats.cross[:, rows], w[rows].T, damping, relative).T


def _fit_columns(weight: torch.Tensor, stats: ProjectionStats, columns: torch.Tensor, damping: float,
                 relative: bool) -> torch.Tensor:
    """Refitted ``weight[:, columns]``, the other columns held fixed."""
    w = weight.double()
    keep = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    keep[columns] = False
    rhs = stats.cross[columns] - stats.gram[columns][:, keep] @ w[:, keep].T  # [|S|, d_out]
    return _damped_solve(stats.gram[columns][:, columns], rhs, w[:, columns].T, damping, relative).T


@dataclass(frozen=True)
class Direction:
    """Which slice of ``down_proj`` a direction refits: ``dim`` 0 rows, 1 columns; how it scores and fits."""

    dim: int
    score_dim: int
    fit: Callable[[torch.Tensor, ProjectionStats, torch.Tensor, float, bool], torch.Tensor]


DIRECTIONS: dict[str, Direction] = {
    "out_channel": Direction(dim=0, score_dim=1, fit=_fit_rows),
    "in_channel": Direction(dim=1, score_dim=0, fit=_fit_columns),
}


def refit(weight: torch.Tensor, stats: ProjectionStats, ratio: float, damping: float, direction: str,
          relative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices along the direction's dim, their refitted values); the original values where the solve is
    not finite, as the reference drops a failed tuning."""
    spec = DIRECTIONS[direction]
    index = _top(_channel_scores(weight, stats, spec.score_dim), ratio)
    values = spec.fit(weight, stats, index, damping, relative)
    if not torch.isfinite(values).all():
        return index, weight.index_select(spec.dim, index).clone()
    return index, values.to(weight.dtype)


def patched(weight: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` with ``values`` along ``dim`` at ``index``."""
    return weight.index_copy(dim, index, values.to(weight.dtype))


@contextlib.contextmanager
def swapped_slice(linear: nn.Linear, dim: int, index: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
    """Use ``values`` for ``linear.weight`` along ``dim`` at ``index`` inside the block, then restore it."""
    with SwapLog() as edits:
        edits.set(linear.weight, "data", patched(linear.weight.data, dim, index, values))
        yield


@contextlib.contextmanager
def captured_input(module: nn.Module, into: list[torch.Tensor]) -> Iterator[None]:
    """Record the first positional input of every call to ``module``."""
    handle = module.register_forward_pre_hook(lambda _m, args: into.append(args[0].detach()))
    try:
        yield
    finally:
        handle.remove()


def measurement_end(stream: SublayerStream, position: int) -> tuple[int | None, int]:
    """(position of the MLP tuned for a removal at ``position`` or None, end of the measured window)."""
    tuning = stream.next_present(position, "mlp") if stream.sublayer(position).kind == "mlp" else (
        position + 1 if not stream.sublayer(position + 1).removed else stream.next_present(position + 1, "mlp"))
    return tuning, (tuning + 1 if tuning is not None else stream.num_positions)


def check_tunable(adapter) -> None:
    """SPRINT's tuning needs each MLP's output to reach the residual stream directly."""
    if adapter.mlp_post_norm is not None or adapter.parallel_residual:
        raise UnsupportedArchitectureError(
            "SPRINT's in-compression tuning refits down_proj against the residual stream, which a post-norm "
            f"or a parallel residual ({type(adapter).__name__}) puts out of its reach; use "
            "--num-candidate-sublayers 0 (removal without tuning) for this family.")


@torch.no_grad()
def tune_for_removal(stream: SublayerStream, states: States, position: int, ratio: float, damping: float,
                     direction: str, relative_damping: bool) -> dict | None:
    """Fit the next MLP's output projection for the removal at ``position`` (None when no MLP follows).

    Returns the refitted slice (``dim``, ``index``, ``values``) plus the projection error before and after,
    on the calibration tokens: the quantity the least-squares step minimises.
    """
    check_tunable(stream.adapter)
    tuning, end = measurement_end(stream, position)
    if tuning is None:
        return None
    mlp = stream.sublayer(tuning)
    down = mlp.linears["down"]
    reference = stream.run(states, position, end)
    entering = stream.run(states, position, tuning, skip={position})
    stats = ProjectionStats.empty(down.in_features, down.out_features, down.weight.device)
    for residual, target, kwargs in zip(entering, reference, stream.kwargs):
        inputs: list[torch.Tensor] = []
        with captured_input(down, inputs):
            stream.adapter.sublayer_forward(mlp, residual, kwargs)
        stats.add(inputs[0], target - residual)
    dim = DIRECTIONS[direction].dim
    index, values = refit(down.weight.data, stats, ratio, damping, direction, relative_damping)
    return {"unit": f"{mlp.name}.{_leaf(mlp, down)}", "module": down, "dim": dim, "index": index,
            "values": values, "error_before": projection_error(down.weight.data, stats),
            "error_after": projection_error(patched(down.weight.data, dim, index, values), stats)}


def _leaf(sublayer, linear) -> str:
    return next(name for name, module in sublayer.module.named_children() if module is linear)
