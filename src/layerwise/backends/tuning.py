"""SPRINT's in-compression tuning: after a sublayer is removed, refit part of the next MLP's output projection
by ridge least squares so that MLP's output matches the unpruned model's again.

With ``X`` the pruned model's inputs to ``down_proj``, ``R`` the residual stream entering that MLP and ``Y``
the unpruned stream leaving it, the MLP should give ``Y - R = X Wᵀ``. A fraction of ``W``'s input channels
(those with the largest |W|·‖X‖) is refitted, the other columns fixed:
``min ‖(Y - R - X₋ W₋ᵀ) - X_S W_Sᵀ‖² + λ‖W_S - W_S⁰‖²``, from the Gram statistics only (no activations kept).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..profile.sublayers import States, SublayerStream


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


def select_columns(weight: torch.Tensor, stats: ProjectionStats, ratio: float) -> torch.Tensor:
    """Input channels to refit: the ``ratio`` share with the largest Σ_rows |W|·‖X_col‖."""
    score = (weight.abs().double() * stats.gram.diagonal().clamp_min(0).sqrt()).sum(dim=0)
    count = max(1, min(weight.shape[1], round(ratio * weight.shape[1])))
    return score.topk(count).indices.sort().values


def fit_columns(weight: torch.Tensor, stats: ProjectionStats, columns: torch.Tensor, damping: float) -> torch.Tensor:
    """Refitted values of ``weight[:, columns]``; ``damping`` is relative to the mean diagonal of XᵀX."""
    w = weight.double()
    keep = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    keep[columns] = False
    gram_ss = stats.gram[columns][:, columns]
    rhs = stats.cross[columns] - stats.gram[columns][:, keep] @ w[:, keep].T  # [|S|, d_out]
    lam = damping * float(gram_ss.diagonal().mean()) if damping > 0 else 0.0
    if lam > 0:
        gram_ss = gram_ss + lam * torch.eye(len(columns), dtype=w.dtype, device=w.device)
        rhs = rhs + lam * w[:, columns].T
    solution = torch.linalg.lstsq(gram_ss, rhs).solution  # [|S|, d_out]
    if not torch.isfinite(solution).all():
        return weight[:, columns].clone()
    return solution.T.to(weight.dtype)


@contextlib.contextmanager
def swapped_columns(linear: nn.Linear, columns: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
    """Use ``values`` for ``linear.weight[:, columns]`` inside the block, then restore the original."""
    original = linear.weight.data[:, columns].clone()
    linear.weight.data[:, columns] = values.to(linear.weight.dtype)
    try:
        yield
    finally:
        linear.weight.data[:, columns] = original


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


@torch.no_grad()
def tune_for_removal(stream: SublayerStream, states: States, position: int, ratio: float,
                     damping: float) -> dict | None:
    """Fit the next MLP's output projection for the removal at ``position`` (None when no MLP follows).

    Returns the tuned columns and values plus the projection error before and after, on the calibration
    tokens: the quantity the least-squares step minimises.
    """
    adapter = stream.adapter
    if adapter.mlp_post_norm is not None or adapter.parallel_residual:
        raise UnsupportedArchitectureError(
            "SPRINT's in-compression tuning refits down_proj against the residual stream, which a post-norm "
            f"or a parallel residual ({type(adapter).__name__}) puts out of its reach; use "
            "--num-candidate-sublayers 0 (removal without tuning) for this family.")
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
    columns = select_columns(down.weight.data, stats, ratio)
    values = fit_columns(down.weight.data, stats, columns, damping)
    tuned = down.weight.data.clone()
    tuned[:, columns] = values
    return {"unit": f"{mlp.name}.{_leaf(mlp, down)}", "module": down, "columns": columns, "values": values,
            "error_before": projection_error(down.weight.data, stats), "error_after": projection_error(tuned, stats)}


def _leaf(sublayer, linear) -> str:
    return next(name for name, module in sublayer.module.named_children() if module is linear)
