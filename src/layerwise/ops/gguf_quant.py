"""GGUF-type quantization (``op: quantize`` with ``method: gguf``): each linear is stored as the bytes llama.cpp
would store for its GGUF type (q8_0, q6_k, q4_k, ...), made by the real quantizers (``layerwise.gguf``), and
computes with exactly those weights dequantized, so a perplexity measured here is of the weights llama.cpp
will run. A type whose block does not divide the input width falls back as ``llama-quantize`` does."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..gguf import GGUFType, gguf_type, stored_type
from ..gguf.activations import round_activations
from ..gguf.quantize import dequantize_matrix, quantize_matrix
from ..models.discovery import LINEAR_LIKE, QUANTIZED_LINEARS
from ..plan import Action
from .base import ApplyContext
from .quantize import QUANTIZED_MODULES, QUANTIZERS


class GGUFLinear(nn.Module):
    """A linear layer stored as one GGUF tensor: ``qdata`` holds its rows in ``kind``'s block format. The
    float weight is dequantized on first use and kept (not saved), so the forward pass is a plain matmul."""

    def __init__(self, in_features: int, out_features: int, kind: str, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kind: GGUFType = gguf_type(kind)
        row_bytes = self.kind.nbytes(1, in_features)
        self.register_buffer("qdata", torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.compute_dtype = dtype
        self._weight: torch.Tensor | None = None
        self._register_load_state_dict_pre_hook(self._forget_weight)

    @classmethod
    def empty(cls, linear: nn.Linear, kind: str) -> "GGUFLinear":
        """A zero-filled GGUF linear shaped like ``linear``, stored as llama.cpp would store ``kind`` for its rows
        (the fallback applied): the shell a saved model's data loads into, or a timing probe."""
        return cls(linear.in_features, linear.out_features, stored_type(kind, linear.in_features).name,
                   linear.bias is not None, linear.weight.dtype, linear.weight.device)

    @classmethod
    def quantize(cls, linear: nn.Linear, kind: str, imatrix: np.ndarray | None = None) -> "GGUFLinear":
        stored = stored_type(kind, linear.in_features)
        module = cls(linear.in_features, linear.out_features, stored.name, linear.bias is not None,
                     linear.weight.dtype, linear.weight.device)
        raw = quantize_matrix(linear.weight.data, stored, imatrix)
        module.qdata.copy_(torch.from_numpy(raw))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.data)
        return module

    def _forget_weight(self, *args, **kwargs) -> None:
        self._weight = None

    def dequantized_weight(self) -> torch.Tensor:
        if self._weight is None or self._weight.device != self.qdata.device:
            weight = dequantize_matrix(self.qdata.cpu().numpy(), self.kind, (self.out_features, self.in_features))
            self._weight = weight.to(device=self.qdata.device, dtype=self.compute_dtype)
        return self._weight

    # round inputs as llama.cpp does before its dot products (``llamacpp_activations``); off by default
    simulate_llamacpp: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.simulate_llamacpp:
            x = round_activations(x, self.kind.name)
        return nn.functional.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={self.kind.name}"


@contextlib.contextmanager
def llamacpp_activations(model: nn.Module) -> Iterator[None]:
    """Within the block, every GGUF linear of ``model`` rounds its inputs as llama.cpp does."""
    modules = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    for module in modules:
        module.simulate_llamacpp = True
    try:
        yield
    finally:
        for module in modules:
            module.simulate_llamacpp = False


def input_importance(context: ApplyContext, unit: str) -> np.ndarray:
    """llama.cpp's importance matrix entry for ``unit``: the mean squared input per column on the calibration
    windows (what ``llama-imatrix`` accumulates), from the run's Profile."""
    stats = context.require_calibration().profile().units[unit]
    return (stats.sum_sq / max(1, stats.tokens)).to(torch.float32).numpy()


@QUANTIZERS.register("gguf")
@torch.no_grad()
def gguf_quantize(model: nn.Module, actions: list[Action], context: ApplyContext) -> None:
    """Store every action's linear as its GGUF type (the importance matrix first, when asked: the Profile is
    of the model before any of these linears changed)."""
    importance = {a.unit: input_importance(context, a.unit) for a in actions if a.imatrix}
    for action in actions:
        linear = model.get_submodule(action.unit)
        model.set_submodule(action.unit, GGUFLinear.quantize(linear, action.format, importance.get(action.unit)))


def _empty(linear: nn.Linear, action: Action) -> GGUFLinear:
    return GGUFLinear.empty(linear, action.format)


QUANTIZED_MODULES.add("gguf", _empty)
LINEAR_LIKE.append(GGUFLinear)
QUANTIZED_LINEARS.append(GGUFLinear)
