"""On-demand Hessian accumulator H = 2/n · Σ x xᵀ of a linear's inputs (SparseGPT, GPTQ)."""

from __future__ import annotations

import torch
from torch import nn


class HessianAccumulator:
    """Running average of 2·x xᵀ over calibration tokens, kept in float32 on the layer's device."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        new = x.shape[0]
        self.hessian *= self.tokens / (self.tokens + new)
        self.tokens += new
        x = x * (2.0 / self.tokens) ** 0.5
        self.hessian += x.t() @ x


def attach_hessians(linears: dict[str, nn.Linear]) -> tuple[dict[str, HessianAccumulator], list]:
    """Hooks accumulating a Hessian per linear; returns the accumulators and the handles to remove."""
    accumulators = {name: HessianAccumulator(m.in_features, m.weight.device) for name, m in linears.items()}
    handles = [
        linear.register_forward_hook(lambda _m, args, _out, acc=accumulators[name]: acc.update(args[0]))
        for name, linear in linears.items()
    ]
    return accumulators, handles
