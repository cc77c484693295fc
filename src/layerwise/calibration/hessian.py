"""On-demand Hessian accumulator H = 2/n · Σ x xᵀ of a linear's inputs (SparseGPT, GPTQ)."""

from __future__ import annotations

import torch
from torch import nn

from .shared_input import per_input_memo


class HessianAccumulator:
    """Running average of 2·x xᵀ over calibration tokens, kept in float32 on the layer's device."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        self.add_gram(*gram(x))

    @torch.no_grad()
    def add_gram(self, gram_matrix: torch.Tensor, tokens: int) -> None:
        """Fold in Σ x xᵀ of ``tokens`` new tokens."""
        self.hessian *= self.tokens / (self.tokens + tokens)
        self.tokens += tokens
        self.hessian += gram_matrix * (2.0 / self.tokens)


def gram(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ x xᵀ over the tokens of ``x`` (float32) and the token count."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.t() @ x, x.shape[0]


def attach_hessians(linears: dict[str, nn.Linear]) -> tuple[dict[str, HessianAccumulator], list]:
    """Forward pre-hooks accumulating a Hessian per linear; returns the accumulators and the handles to remove.

    Linears fed the same tensor (q/k/v, gate/up) share one Gram-matrix product per forward. Pre-hooks: the
    inputs are taken before the linear runs, so a pass may stop there (``BlockwiseRunner.feed``).
    """
    accumulators = {name: HessianAccumulator(m.in_features, m.weight.device) for name, m in linears.items()}
    shared_gram = per_input_memo(gram)
    handles = [
        linear.register_forward_pre_hook(lambda _m, args, acc=accumulators[name]: acc.add_gram(*shared_gram(args[0])))
        for name, linear in linears.items()
    ]
    return accumulators, handles
