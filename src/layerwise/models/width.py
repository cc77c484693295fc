"""Width units and every operation on them, written once for all families.

A sublayer's units are the KV groups of an attention (a KV head with the query heads sharing it, so
grouped-query attention stays consistent) or the channels of an MLP. A ``UnitLayout`` says where each unit
sits in every tensor it owns (``Slot``: a parameter, the dimension, and one or more segments: q/k/v of a
fused ``qkv`` projection are three segments of one weight, biases and per-head norms follow their rows), and
which columns of the output projection it feeds. Slicing, permuting, masking and zero-copy prefix views are
functions of that description, so the structured backend, the importance scores, the RL proxy and the runtime
profiles share them and a new family only describes its layout (``ModelAdapter``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Slot:
    """Where every unit lies in one parameter: along ``dim``, unit ``u`` holds indices
    ``offset + u * size + j`` (``j < size``) of each ``(offset, size)`` segment."""

    module: str  # path of the owning module inside the sublayer (``q_proj``, ``qkv_proj``, ``q_norm``)
    param: str  # ``weight`` or ``bias``
    dim: int
    segments: tuple[tuple[int, int], ...]

    def index(self, units: Sequence[int]) -> torch.Tensor:
        """Indices of ``units`` (in that order), segment after segment."""
        return torch.tensor([offset + unit * size + j for offset, size in self.segments for unit in units
                             for j in range(size)], dtype=torch.long)

    @property
    def per_unit(self) -> int:
        return sum(size for _, size in self.segments)


@dataclass(frozen=True)
class UnitLayout:
    """The units of one sublayer: how many, their slots, and the output projection's input columns."""

    kind: str  # attention or mlp
    units: int
    slots: tuple[Slot, ...]
    output: Slot  # the columns of the output projection (o_proj / down_proj) each unit feeds

    def weight_slots(self, sublayer: nn.Module) -> list[Slot]:
        """Slots in linear weights (what importance scores and parameter counts cover)."""
        return [s for s in self.slots if s.param == "weight" and isinstance(sublayer.get_submodule(s.module), nn.Linear)]

    def parameters_per_unit(self, sublayer: nn.Module) -> int:
        """Weights one unit owns across the sublayer's linears."""
        total = 0
        for slot in self.weight_slots(sublayer):
            weight = sublayer.get_submodule(slot.module).weight
            total += slot.per_unit * weight.shape[1 - slot.dim]
        return total

    def unit_sums(self, sublayer: nn.Module, per_weight: Callable[[nn.Linear], torch.Tensor]) -> torch.Tensor:
        """Σ of ``per_weight(linear)`` (shaped like the weight) over each unit's weights, as float64 on CPU."""
        totals = torch.zeros(self.units, dtype=torch.float64)
        for slot in self.weight_slots(sublayer):
            values = per_weight(sublayer.get_submodule(slot.module)).float()
            values = values if slot.dim == 0 else values.t()
            for offset, size in slot.segments:
                block = values[offset : offset + self.units * size].reshape(self.units, size, -1)
                totals += block.sum(dim=(1, 2)).double().cpu()
        return totals


def keep_units(sublayer: nn.Module, layout: UnitLayout, units: Sequence[int]) -> None:
    """Keep only ``units`` of the sublayer, in that order (a permutation when all are given): linears are
    replaced by smaller ones, 1-D parameters (biases, per-head norms) are cut with them."""
    by_module: dict[str, list[Slot]] = {}
    for slot in layout.slots:
        by_module.setdefault(slot.module, []).append(slot)
    for path, slots in by_module.items():
        module = sublayer.get_submodule(path)
        indices = {(s.param, s.dim): s.index(units) for s in slots}
        if isinstance(module, nn.Linear):
            sublayer.set_submodule(path, _take(module, indices.get(("weight", 0)), indices.get(("weight", 1))))
            continue
        for (param, dim), index in indices.items():
            tensor = getattr(module, param)
            tensor.data = tensor.data.index_select(dim, index.to(tensor.device)).contiguous()


@torch.no_grad()
def _take(linear: nn.Linear, rows: torch.Tensor | None, columns: torch.Tensor | None) -> nn.Linear:
    weight = linear.weight
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if columns is not None:
        weight = weight.index_select(1, columns.to(weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    new.weight.copy_(weight)
    if linear.bias is not None:
        new.bias.copy_(linear.bias if rows is None else linear.bias.index_select(0, rows.to(weight.device)))
    return new


def prefix_modules(sublayer: nn.Module, layout: UnitLayout, kept: int) -> dict[str, nn.Module]:
    """Replacement linears computing with the first ``kept`` units only: views of the dense weights where the
    kept indices are one contiguous run (separate q/k/v, gate/up), copies where they are not (fused qkv)."""
    replacements: dict[str, nn.Module] = {}
    by_module: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for slot in layout.slots:
        by_module.setdefault(slot.module, {})[(slot.param, slot.dim)] = slot.index(range(kept))
    for path, indices in by_module.items():
        module = sublayer.get_submodule(path)
        if isinstance(module, nn.Linear):
            replacements[path] = _view(module, indices.get(("weight", 0)), indices.get(("weight", 1)))
        else:  # a norm over the units' rows: the same module with a shorter weight
            replacements[path] = _norm_view(module, indices[("weight", 0)])
    return replacements


def _norm_view(norm: nn.Module, index: torch.Tensor) -> nn.Module:
    """A shallow copy of ``norm`` whose weight is the rows ``index`` of the original's (a view for a prefix)."""
    new = copy.copy(norm)
    new._parameters = dict(norm._parameters)
    prefix = _contiguous(index)
    weight = norm.weight[:prefix] if prefix is not None else norm.weight.index_select(0, index.to(norm.weight.device))
    new.weight = nn.Parameter(weight, requires_grad=False)
    return new


def _contiguous(index: torch.Tensor | None) -> int | None:
    """The length of ``index`` when it is ``0, 1, ..., n-1`` (a prefix), else None."""
    if index is None or not torch.equal(index, torch.arange(len(index))):
        return None
    return len(index)


def _view(linear: nn.Linear, rows: torch.Tensor | None, columns: torch.Tensor | None) -> nn.Linear:
    prefix_rows, prefix_columns = _contiguous(rows), _contiguous(columns)
    if (rows is not None and prefix_rows is None) or (columns is not None and prefix_columns is None):
        return _take(linear, rows, columns)
    weight = linear.weight
    if prefix_rows is not None:
        weight = weight[:prefix_rows]
    if prefix_columns is not None:
        weight = weight[:, :prefix_columns]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias[:prefix_rows] if prefix_rows is not None else linear.bias,
                                requires_grad=False)
    return new


class UnitMask:
    """Dropping units by masking instead of slicing, exactly: the output projection's input columns of dropped
    units are zeroed and, where an RMS norm spans the units' rows (OLMo 2's q/k norms over the whole
    projection), its dropped inputs are zeroed, its epsilon scaled by kept/all and its output by √(kept/all),
    so it normalises over the kept rows as the sliced model's norm does. ``set(dropped)`` switches in place;
    ``remove()`` undoes it."""

    def __init__(self, sublayer: nn.Module, layout: UnitLayout) -> None:
        self.layout = layout
        target = sublayer.get_submodule(layout.output.module)
        weight = target.weight
        self.output = torch.ones(target.in_features, device=weight.device, dtype=weight.dtype)
        self.handles = [mask_input(target, self.output)]
        self.norms: list[tuple[Slot, nn.Module, torch.Tensor, torch.Tensor, str, float]] = []
        for slot in layout.slots:
            module = sublayer.get_submodule(slot.module)
            if isinstance(module, nn.Linear) or slot.param != "weight":
                continue
            keep = torch.ones(getattr(module, slot.param).shape[slot.dim], device=weight.device, dtype=weight.dtype)
            scale = torch.ones((), device=weight.device, dtype=weight.dtype)
            self.handles.append(mask_input(module, keep))
            self.handles.append(module.register_forward_hook(lambda _m, _args, out, s=scale: out * s))
            epsilon = next(name for name in ("variance_epsilon", "eps") if hasattr(module, name))
            self.norms.append((slot, module, keep, scale, epsilon, getattr(module, epsilon)))

    def set(self, dropped: Sequence[int]) -> None:
        dropped = list(dropped)
        self.output.copy_(output_mask(self.layout, dropped, self.output.numel(), self.output.device,
                                      self.output.dtype))
        for slot, module, keep, scale, epsilon, original in self.norms:
            keep.fill_(1)
            if dropped:
                keep[slot.index(dropped).to(keep.device)] = 0
            share = float(keep.sum() / keep.numel())
            scale.fill_(share ** 0.5)
            setattr(module, epsilon, original * share)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for _slot, module, _keep, _scale, epsilon, original in self.norms:
            setattr(module, epsilon, original)


def output_mask(layout: UnitLayout, dropped: Sequence[int], size: int, device: torch.device | str,
                dtype: torch.dtype) -> torch.Tensor:
    """1 for the output projection's input columns of kept units, 0 for those of ``dropped`` ones."""
    mask = torch.ones(size, device=device, dtype=dtype)
    if len(dropped):
        mask[layout.output.index(list(dropped)).to(device)] = 0
    return mask


def mask_input(linear: nn.Module, mask: torch.Tensor):
    """A pre-hook on ``linear`` multiplying its input by ``mask`` (a dropped unit then contributes exactly
    what slicing it away would); returns the hook handle."""
    return linear.register_forward_pre_hook(lambda _module, args: (args[0] * mask, *args[1:]))
