"""Measured model size from the stored tensors: parameters, non-zeros, bytes, decoder-linear sparsity."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..models.discovery import QUANTIZED_LINEARS, decoder_linears


@dataclass(frozen=True)
class SizeReport:
    parameters: int
    nonzero_parameters: int
    weight_bytes: int
    decoder_linear_parameters: int
    decoder_linear_zeros: int

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over all decoder linears (the budget's scope)."""
        return self.decoder_linear_zeros / max(1, self.decoder_linear_parameters)

    def as_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity}


@torch.no_grad()
def measure_size(model: nn.Module) -> SizeReport:
    """Count every stored tensor once (tied weights share storage); masked zeros still cost bytes."""
    seen: set[int] = set()
    parameters = nonzero = weight_bytes = 0
    for tensor in model.state_dict().values():
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        weight_bytes += tensor.numel() * tensor.element_size()
        if tensor.is_floating_point():
            parameters += tensor.numel()
            nonzero += int(torch.count_nonzero(tensor))
    # a quantized linear stores its weights as integer codes: they are parameters all the same
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, tuple(QUANTIZED_LINEARS)))
    linears = decoder_linears(model).values()
    return SizeReport(
        parameters=parameters + quantized,
        nonzero_parameters=nonzero + quantized,
        weight_bytes=weight_bytes,
        decoder_linear_parameters=sum(m.weight.numel() for m in linears),
        decoder_linear_zeros=sum(int((m.weight == 0).sum()) for m in linears),
    )
