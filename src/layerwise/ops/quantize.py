"""Weight-only quantization (``op: quantize``): per linear, 2/3/4/8 bits, symmetric or asymmetric,
per output channel or group-wise along the input (a last group may be shorter when the group size does
not divide the input width). Codes are stored packed with float16 scales and uint8 zero points, so
the model's weight bytes are what it really stores; the forward pass dequantizes per layer on the fly.

Methods: ``rtn`` (round to nearest) and ``gptq`` (error-compensating column by column with the inverse
Hessian of the calibration inputs, sequential over blocks like SparseGPT).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from ..gguf import GGUF_TYPES
from ..models.discovery import LINEAR_LIKE, QUANTIZED_LINEARS, decoder_linears
from ..plan import ACTIONS, Action
from ..registry import Registry
from .awq import apply_awq
from .base import OP_METHODS, OP_UNITS, OPS, STRUCTURE_REPLAY, ApplyContext, dispatch_by_method, sequential_hessian_pass
from .grid import dequantize, dequantize_codes, group_bounds, quant_params, quantize_codes, rtn_quantize, rtn_round_trip  # noqa: F401
from .packing import pack, packed_bytes, unpack
from .sparsegpt import inverse_hessian_factor


class QuantizeAction(Action):
    """Store one linear's weight at ``bits`` bits, per output channel (``group_size`` None) or in groups of
    ``group_size`` inputs (a shorter last group when it does not divide the input width); or, with
    ``format``, as that GGUF type (method ``gguf``: llama.cpp's own grid and quantizer, ``bits`` nominal)."""

    structural: ClassVar[bool] = True
    op: Literal["quantize"] = "quantize"
    bits: int = Field(ge=2, le=16, description="2-8 on layerwise's own grid; a GGUF type's nominal width")
    group_size: Optional[int] = Field(128, ge=1)
    symmetric: bool = False
    method: str = "rtn"
    awq: bool = Field(False, description="AWQ first: fold activation-aware input scales in and clip weights, "
                                          "both searched on calibration outputs")
    act_order: bool = Field(False, description="gptq: columns in order of decreasing Hessian diagonal, static groups")
    format: Optional[str] = Field(None, description="GGUF type (q4_k, q8_0, ...); needs method gguf")
    imatrix: bool = Field(False, description="gguf: weight the quantizer by the calibration's mean squared inputs")

    @model_validator(mode="after")
    def _format_needs_gguf_method(self) -> "QuantizeAction":
        if (self.format is None) != (self.method != "gguf"):
            raise ValueError("a GGUF format goes with method 'gguf', and method 'gguf' needs a format")
        if self.format is None and self.bits > 8:
            raise ValueError(f"layerwise's own grid stores 2 to 8 bits, not {self.bits}")
        if self.format is not None:

            if self.format not in GGUF_TYPES:
                raise ValueError(f"unknown GGUF type '{self.format}' (known: {', '.join(GGUF_TYPES)})")
        return self


ACTIONS.add("quantize", QuantizeAction)


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored as packed ``bits``-bit codes with per-group scales and zeros."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 bias: bool = False, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = len(group_bounds(in_features, group_size))
        self.register_buffer("qweight", torch.zeros(packed_bytes(in_features * out_features, bits),
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.compute_dtype = dtype

    @classmethod
    def from_codes(cls, linear: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, group_size: int | None) -> "QuantizedLinear":
        module = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                     linear.weight.dtype, linear.weight.device)
        module.qweight.copy_(pack(codes.to(torch.int64), bits))
        module.scales.copy_(scales.to(torch.float16))
        module.zeros.copy_(zeros.to(torch.uint8))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.data)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight, computed group by group from the packed codes (nothing cached)."""
        codes = unpack(self.qweight, self.bits, self.in_features * self.out_features, torch.float32)
        codes = codes.reshape(self.out_features, self.in_features)
        return dequantize(codes, self.scales.float(), self.zeros.float(), self.group_size).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def quantized_storage(model: nn.Module) -> dict[str, int]:
    """Measured storage of the model's quantized linears: the bytes of their stored tensors (packed codes,
    scales, zeros, bias) and their weight count, whose 16-bit size is ``2 × weights``."""
    modules = [m for m in model.modules() if isinstance(m, tuple(QUANTIZED_LINEARS))]
    stored = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    return {"quantized_bytes": stored, "quantized_weights": sum(m.in_features * m.out_features for m in modules)}


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  block_size: int = 128, dampening: float = 0.01, act_order: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ: quantize columns in order, spreading each column's error over the columns not yet quantized
    through the inverse Hessian's upper Cholesky factor. Group parameters are set when a group begins, or,
    with ``act_order``, from the unupdated weight up front (static groups) while columns go in order of
    decreasing Hessian diagonal, so the stored groups stay contiguous."""

    w = weight.float().clone()
    columns = w.shape[1]
    bounds = group_bounds(columns, group_size)
    group_of = torch.cat([torch.full((end - start,), g) for g, (start, end) in enumerate(bounds)])
    scales = torch.zeros(w.shape[0], len(bounds))
    zeros = torch.zeros(w.shape[0], len(bounds))
    order = torch.arange(columns)
    if act_order:
        for g, (start, end) in enumerate(bounds):
            scales[:, g], zeros[:, g] = quant_params(w[:, start:end], bits, symmetric)
        order = torch.argsort(torch.diag(hessian), descending=True)
        w, hessian = w[:, order], hessian[order][:, order]
    hinv = inverse_hessian_factor(hessian.float(), w, dampening)
    starts = {start: g for g, (start, _) in enumerate(bounds)}
    codes = torch.zeros_like(w)
    for block_start in range(0, columns, block_size):
        block_end = min(block_start + block_size, columns)
        w1, errors = w[:, block_start:block_end].clone(), torch.zeros(w.shape[0], block_end - block_start)
        h1 = hinv[block_start:block_end, block_start:block_end]
        for i in range(block_end - block_start):
            column = block_start + i
            if not act_order and column in starts:
                group = starts[column]
                end = bounds[group][1]
                # the group's not yet quantized columns, as updated so far
                current = torch.cat([w1[:, i:], w[:, block_end:]], 1)[:, : end - column]
                scales[:, group], zeros[:, group] = quant_params(current, bits, symmetric)
            group = int(group_of[order[column]])
            scale, zero = scales[:, group], zeros[:, group]
            q = quantize_codes(w1[:, i : i + 1], scale, zero, bits)[:, 0]
            codes[:, column] = q
            error = (w1[:, i] - dequantize_codes(q[:, None], scale, zero)[:, 0]) / h1[i, i]
            w1[:, i:] -= error[:, None] @ h1[i, i:][None, :]
            errors[:, i] = error
        w[:, block_end:] -= errors @ hinv[block_start:block_end, block_end:]
    if act_order:
        codes = codes[:, torch.argsort(order)]
    return codes, scales, zeros


Quantizer = Callable[[nn.Module, list[Action], ApplyContext], None]
QUANTIZERS: Registry[Quantizer] = Registry("quantization method")
OP_METHODS["quantize"] = QUANTIZERS
OP_UNITS.add("quantize", (lambda model: set(decoder_linears(model)), "an unquantized decoder linear"))


def _install(model: nn.Module, action: Action, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
    linear = model.get_submodule(action.unit)
    model.set_submodule(action.unit, QuantizedLinear.from_codes(linear, codes, scales, zeros, action.bits,
                                                                action.group_size))


@OPS.register("quantize")
def apply_quantize(model: nn.Module, actions: list[Action], context: ApplyContext) -> None:
    """AWQ's scale search first where asked (an exact equivalence on the float model), then the quantizers."""
    if any(action.awq for action in actions):
        apply_awq(model, actions, context)
    dispatch_by_method(QUANTIZERS, model, actions, context)


@QUANTIZERS.register("rtn")
@torch.no_grad()
def rtn(model: nn.Module, actions: list[Action], context: ApplyContext) -> None:
    """Round every weight to the nearest level of its group."""
    for action in actions:
        weight = model.get_submodule(action.unit).weight.data
        _install(model, action, *rtn_quantize(weight, action.bits, action.group_size, action.symmetric))


@QUANTIZERS.register("gptq")
def gptq(model: nn.Module, actions: list[Action], context: ApplyContext) -> None:
    """Sequential GPTQ over the calibration windows: each block's Hessians see the already-quantized blocks."""

    def quantize(linear: nn.Module, action: Action, hessian: torch.Tensor) -> None:
        _install(model, action, *gptq_quantize(linear.weight.data, hessian, action.bits, action.group_size,
                                               action.symmetric, act_order=action.act_order))

    sequential_hessian_pass(model, actions, context, "gptq", quantize)


def _empty_packed(linear: nn.Linear, action: Action) -> QuantizedLinear:
    return QuantizedLinear(linear.in_features, linear.out_features, action.bits, action.group_size,
                           linear.bias is not None, linear.weight.dtype, linear.weight.device)


# quantization method -> an empty module of the right shapes for one action, so saved tensors load into it
QUANTIZED_MODULES: Registry[Callable[[nn.Linear, Action], nn.Module]] = Registry("quantized module")
QUANTIZED_MODULES.add("rtn", _empty_packed)
QUANTIZED_MODULES.add("gptq", _empty_packed)


def _replay(model: nn.Module, actions: list[Action]) -> None:
    """Shapes only: empty quantized modules where the plan quantized, so the saved codes load into them."""
    for action in actions:
        linear = model.get_submodule(action.unit)
        model.set_submodule(action.unit, QUANTIZED_MODULES.get(action.method)(linear, action))


STRUCTURE_REPLAY.add("quantize", _replay)
LINEAR_LIKE.append(QuantizedLinear)
QUANTIZED_LINEARS.append(QuantizedLinear)
