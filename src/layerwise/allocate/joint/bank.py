"""The level bank: every unit's variants computed once, so scoring a candidate swaps modules and runs one
forward pass (EvoPress's database of compressed levels, here over widths, removal and GGUF types at once).

The bank's private copy of the model is reordered so that each block's KV groups and FFN channels lie in
importance order (a function-preserving permutation, the adapter's ``order_units``); a width
level then keeps a *prefix*, and its linears are views of one quantized copy of the unit per GGUF type (rows
are quantized independently, and FFN widths are multiples of the type's block, so a prefix of a quantized
``down_proj`` row is the quantization of the prefix). Where a prefix is not exact (an ``o_proj`` whose narrower
rows change the stored type), that variant is quantized on its own, once.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...gguf import stored_type
from ...gguf.quantize import round_trip
from ...models import get_adapter
from ...models.swaps import SwapLog
from ...models.width import prefix_modules
from .space import Genome, JointSpace, Level


class LevelBank:
    """A private, importance-ordered copy of the model whose units can be set to any level in place."""

    def __init__(self, model: nn.Module, space: JointSpace, groups: dict[int, list[int]],
                 channels: dict[int, list[int]]) -> None:
        source = get_adapter(model)
        self.originals = [source.sublayer(unit.name).module for unit in space.units]  # the caller's, unordered
        self.model = copy.deepcopy(model).eval()
        self.space = space
        self.adapter = get_adapter(self.model)
        self.adapter.order_units(groups, channels)
        self.sublayers = [self.adapter.sublayer(unit.name) for unit in space.units]
        self.templates: dict[tuple[int, str, bool], nn.Module] = {}
        self.exact: dict[tuple[int, str, int], dict[str, nn.Module]] = {}
        self.edits = [SwapLog() for _ in space.units]  # each unit's current level, undone before the next
        self.current: list[int | None] = [None for _ in space.units]  # None: the float dense sublayer
        self.assemble(space.dense())

    @torch.no_grad()
    def _template(self, index: int, kind: str, full: bool = False) -> nn.Module:
        """Unit ``index``'s sublayer at full width with every linear rounded to ``kind`` (made once): in
        importance order for the narrower levels' prefixes, in the model's own order for the full width (as
        the backend quantizes an unsliced sublayer: a row's blocks then hold the same columns)."""
        key = (index, kind, full)
        if key not in self.templates:
            template = copy.deepcopy(self.originals[index] if full else self.sublayers[index].module)
            for linear in (m for m in template.modules() if isinstance(m, nn.Linear)):
                rounded = round_trip(linear.weight.data, stored_type(kind, linear.in_features))
                linear.weight.data = rounded.to(linear.weight.dtype)
            self.templates[key] = template
        return self.templates[key]

    @torch.no_grad()
    def _replacements(self, index: int, level: Level) -> dict[str, nn.Module]:
        unit = self.space.units[index]
        layout = self.adapter.layout(self.sublayers[index])
        full = level.kept == unit.total
        replacements = prefix_modules(self._template(index, level.kind, full), layout, level.kept)
        if full:
            return replacements
        for path, module in replacements.items():
            if isinstance(module, nn.Linear) and not self._prefix_exact(unit.total, level, module, path, layout):
                key = (index, level.kind, level.kept)
                if key not in self.exact:  # quantize the float prefix itself, as the backend will
                    floats = prefix_modules(self.sublayers[index].module, layout, level.kept)
                    self.exact[key] = {}
                    for name, linear in floats.items():
                        if isinstance(linear, nn.Linear):
                            linear = copy.deepcopy(linear)
                            linear.weight = nn.Parameter(round_trip(linear.weight.data, stored_type(
                                level.kind, linear.in_features)).to(linear.weight.dtype), requires_grad=False)
                        self.exact[key][name] = linear
                return self.exact[key]
        return replacements

    def _prefix_exact(self, total: int, level: Level, module: nn.Linear, path: str, layout) -> bool:
        """A prefix view of the full-width rounded weight equals rounding the prefix: rows always do; a column
        prefix does when its length keeps the stored type and is a whole number of its blocks."""
        columns = module.in_features
        dense_columns = next((s for s in layout.slots if s.module == path and s.dim == 1), None)
        if dense_columns is None:
            return True
        full_columns = dense_columns.per_unit * total
        if columns == full_columns:
            return True
        kind = stored_type(level.kind, full_columns)
        return stored_type(level.kind, columns) == kind and columns % kind.block == 0

    def set(self, index: int, level_index: int) -> None:
        """Put unit ``index`` at its level ``level_index`` (undoing its previous level first)."""
        if self.current[index] == level_index:
            return
        self.edits[index].undo()
        level = self.space.units[index].levels[level_index]
        sublayer = self.sublayers[index]
        if level.removed:
            self.edits[index] = self.adapter.remove(sublayer)
        else:
            edits = self.edits[index] = SwapLog()
            for name, new in self._replacements(index, level).items():
                edits.replace(sublayer.module, name, new)
            if sublayer.kind == "attention":
                geometry = self.adapter.head_geometry(sublayer.block)
                edits.head_counts(sublayer.module, level.kept * geometry.group_size, level.kept)
        self.current[index] = level_index

    def assemble(self, genome: Genome) -> nn.Module:
        """The bank's model set to ``genome`` (only units whose level changed are touched)."""
        for index, level_index in enumerate(genome):
            self.set(index, level_index)
        return self.model
