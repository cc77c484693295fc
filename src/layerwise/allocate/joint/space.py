"""The joint search space: per block, the attention's and the MLP's level, each a (width, GGUF type) pair or
removal, and what a whole choice (a *genome*: one level index per unit) costs in stored bytes and predicted
milliseconds. Budgets are checked on the exact costs of the whole genome (removals that leave llama.cpp stubs
make bytes non-additive), so every genome a search keeps fits."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from torch import nn

from ...cost.latency_table import LatencyTable, LevelLatencyTable
from ...cost.typed_latency import TypedLevelLatencyTable
from ...errors import BudgetError
from ...export.gguf_export import BlockShape
from ...gguf import gguf_type, stored_type
from ...models import get_adapter
from ..levels import GGUFLevels

Genome = tuple[int, ...]


@dataclass(frozen=True)
class Level:
    """One unit's choice: keep ``kept`` width units (KV groups or channels) stored as GGUF ``kind``, or remove
    the sublayer (``kept == 0``)."""

    kept: int
    kind: str = "f16"

    @property
    def removed(self) -> bool:
        return self.kept == 0

    def describe(self, unit_size: int = 1) -> str:
        return "removed" if self.removed else f"{self.kept * unit_size}@{self.kind}"


@dataclass
class Unit:
    """One attention or MLP sublayer and its levels, with the shapes its costs are computed from."""

    name: str
    block: int
    kind: str  # attention or mlp
    total: int  # KV groups or channels
    levels: list[Level]
    linears: dict[str, tuple[int, int, str]]  # role -> (rows, row length: per kept unit on the scaled dim)
    _bytes: dict[Level, int] = field(default_factory=dict, repr=False)

    def level_bytes(self, level: Level) -> int:
        """Stored bytes of the unit's linears at ``level`` (llama.cpp's fallback types included)."""
        if level.removed:
            return 0
        if level in self._bytes:
            return self._bytes[level]
        total = 0
        for rows_per, columns_per, scaled in self.linears.values():
            rows = rows_per * level.kept if scaled == "rows" else rows_per
            columns = columns_per * level.kept if scaled == "columns" else columns_per
            total += stored_type(level.kind, columns).nbytes(rows, columns)
        self._bytes[level] = total
        return total


@dataclass
class Budgets:
    """At most ``max_bytes`` GGUF tensor bytes and/or at least ``target_speedup`` predicted speedup."""

    max_bytes: Optional[int] = None
    target_speedup: Optional[float] = None


@dataclass
class JointSpace:
    """All units and levels of one model, the cost tables and the budgets."""

    units: list[Unit]
    budgets: Budgets
    hidden: int
    head_dim: int
    fixed_bytes: int  # embedding (and untied output) at the embedding type, and the final norm
    latency: Optional[LatencyTable] = None
    width_latency: Optional[LevelLatencyTable] = None
    kinds: list[str] = field(default_factory=list)
    # an engine whose speed depends on the GGUF types (llama.cpp decode): replaces the two tables above
    typed_latency: Optional[TypedLevelLatencyTable] = None

    # --- costs ---------------------------------------------------------------------------------------------
    def bytes(self, genome: Genome) -> int:
        """GGUF tensor bytes of the genome as ``export_gguf`` writes it: linears at their stored types, f32
        norms, and llama.cpp's stubs (a removed MLP beside a kept attention; a removed layer-0 attention)."""
        total = self.fixed_bytes + sum(u.level_bytes(u.levels[i]) for u, i in zip(self.units, genome))
        for block, (attention, mlp) in enumerate(self.blocks(genome)):  # the export's norms and stubs
            present = 0 if attention.removed else 1  # only presence decides norms and stubs
            shape = BlockShape.of(block, present, present, 0 if mlp.removed else 1)
            total += 4 * self.hidden * shape.norms + shape.stub_bytes(self.hidden, self.head_dim)
        return total

    @property
    def timed(self) -> bool:
        return self.typed_latency is not None or (self.latency is not None and self.width_latency is not None)

    @property
    def dense_ms(self) -> float:
        """The dense model's time in the tables' setting (the speedup's numerator)."""
        if not self.timed:
            raise BudgetError("This joint space has no latency tables: a speed budget needs them.")
        return self.typed_latency.dense_ms if self.typed_latency is not None else self.latency.total_ms

    def level_saved_ms(self, unit: Unit, level: Level) -> float:
        """What ``unit`` at ``level`` saves against its dense level, per the measured tables (GGUF types change
        only a typed table's engine, llama.cpp; PyTorch computes every type dequantized)."""
        if self.typed_latency is not None:
            return self.typed_latency.saved(unit.kind, level.kept, level.kind)
        if level.removed:
            return self.latency.sublayer_ms[unit.kind]
        return self.width_latency.saved_ms[unit.kind][level.kept] if level.kept < unit.total else 0.0

    def milliseconds(self, genome: Genome) -> float:
        """Predicted latency in the tables' setting: the dense time less what each unit's level saves."""
        dense = self.dense_ms
        return dense - sum(self.level_saved_ms(u, u.levels[i]) for u, i in zip(self.units, genome))

    def speedup(self, genome: Genome) -> float:
        return self.dense_ms / max(self.milliseconds(genome), 1e-9)

    def _unit_ms(self, unit: Unit, level: Level) -> float:
        """The unit's own time at ``level``: what removing it saves, less what ``level`` saves."""
        return self.level_saved_ms(unit, Level(0)) - self.level_saved_ms(unit, level)

    def violation(self, genome: Genome) -> float:
        """How far over its budgets the genome is, each in units of its limit (0: fits)."""
        over = 0.0
        if self.budgets.max_bytes is not None:
            over += max(0.0, self.bytes(genome) / self.budgets.max_bytes - 1)
        if self.budgets.target_speedup is not None:
            limit = self.dense_ms / self.budgets.target_speedup
            over += max(0.0, self.milliseconds(genome) / limit - 1)
        return over

    def fits(self, genome: Genome) -> bool:
        return self.violation(genome) == 0.0

    def costs(self, genome: Genome) -> dict[str, float]:
        out: dict[str, float] = {"bytes": self.bytes(genome)}
        if self.timed:
            out["predicted_ms"] = round(self.milliseconds(genome), 4)
            out["predicted_speedup"] = round(self.speedup(genome), 4)
        return out

    def blocks(self, genome: Genome) -> list[tuple[Level, Level]]:
        levels: dict[tuple[int, str], Level] = {(u.block, u.kind): u.levels[i] for u, i in zip(self.units, genome)}
        blocks = sorted({u.block for u in self.units})
        return [(levels[(b, "attention")], levels[(b, "mlp")]) for b in blocks]

    # --- genomes ---------------------------------------------------------------------------------------------
    def dense(self) -> Genome:
        return tuple(0 for _ in self.units)  # levels are listed best-first: full width at the widest type

    def uniform(self, compress: Callable[[Unit], bool] | None = None) -> Genome:
        """The best-first level of each unit whose relative cost is at most one common fraction ``t``, with the
        largest ``t`` that fits, then units in order one fraction back up while it fits: uniform compression
        (uniform types at full width under a byte budget, uniform widths under a speed budget). Only units
        ``compress`` accepts change (all by default)."""
        compressible = [compress is None or compress(u) for u in self.units]
        fractions = {self._relative(u, level) for u, ok in zip(self.units, compressible) if ok for level in u.levels}
        thresholds = sorted(fractions | {1.0}, reverse=True)

        def at(t: float, unit: Unit, ok: bool) -> int:
            return next(i for i, level in enumerate(unit.levels) if self._relative(unit, level) <= (t if ok else 1.0) + 1e-12)

        for position, t in enumerate(thresholds):
            genome = tuple(at(t, u, ok) for u, ok in zip(self.units, compressible))
            if self.fits(genome):
                if position == 0:
                    return genome
                genes = list(genome)
                for index, (unit, ok) in enumerate(zip(self.units, compressible)):
                    trial = genes[:index] + [at(thresholds[position - 1], unit, ok)] + genes[index + 1 :]
                    if self.fits(tuple(trial)):
                        genes = trial
                return tuple(genes)
        raise BudgetError(self.unreachable())

    def unreachable(self) -> str:
        """Why no genome fits, with the budget this space can reach: the smallest file (every sublayer at its
        cheapest level, what stays outside the sublayers named) and the fastest predicted speedup."""
        reasons = []
        if self.budgets.max_bytes is not None:
            smallest = self.bytes(tuple(min(range(len(u.levels)), key=lambda i, u=u: u.level_bytes(u.levels[i]))
                                        for u in self.units))
            if smallest > self.budgets.max_bytes:
                reasons.append(f"--max-bytes {self.budgets.max_bytes:,} is below the smallest this model and these "
                               f"levels reach, {smallest:,} bytes ({self.fixed_bytes:,} of them the token embedding, "
                               f"output and final norm, which no level shrinks); raise it to at least {smallest:,}")
        if self.budgets.target_speedup is not None:
            fastest = self.speedup(tuple(max(range(len(u.levels)), key=lambda i, u=u: self.level_saved_ms(u, u.levels[i]))
                                         for u in self.units))
            if fastest < self.budgets.target_speedup:
                reasons.append(f"--target-speedup {self.budgets.target_speedup:g} is above the fastest these levels "
                               f"are predicted to reach, {fastest:.3f}x; lower it to at most {fastest:.3f}")
        if not reasons:
            reasons.append("each budget is reachable alone, not both at once; loosen one of them")
        return "No choice of levels meets the budget: " + "; ".join(reasons) + "."

    def starts(self) -> list[Genome]:
        """Uniform starting points: all units, attention only, MLPs only (those that fit, distinct), so a search
        begins from the best kind of uniform compression for this budget rather than from one guess."""
        found = [self.uniform()]
        for kind in ("attention", "mlp"):
            try:
                found.append(self.uniform(lambda unit, kind=kind: unit.kind == kind))
            except BudgetError:
                continue
        return list(dict.fromkeys(found))

    def _relative(self, unit: Unit, level: Level) -> float:
        """The level's cost relative to the unit's first (dense) level, the larger over the active budgets."""
        values = []
        if self.budgets.max_bytes is not None:
            values.append(unit.level_bytes(level) / max(1, unit.level_bytes(unit.levels[0])))
        if self.budgets.target_speedup is not None:
            if self.typed_latency is not None:
                values.append(max(0.0, self._unit_ms(unit, level)) / max(1e-9, self._unit_ms(unit, unit.levels[0])))
            else:
                values.append(0.0 if level.removed else level.kept / unit.total)
        return max(values) if values else 1.0

    def moves(self, index: int, level_index: int) -> list[int]:
        """Levels one step from ``level_index`` along one axis of unit ``index``: the next wider or narrower type at
        the same width, the next wider or narrower width at the same type, removal; from removal, back to the
        narrowest width at the narrowest type. (Single-axis steps, as EvoPress's level switches: a step along a
        mixed ladder of widths and types would turn a q4_k MLP into a half-width q8_0 one.)"""
        unit = self.units[index]
        level = unit.levels[level_index]
        lookup = {(lv.kept, lv.kind): i for i, lv in enumerate(unit.levels) if not lv.removed}
        widths = sorted({kept for kept, _ in lookup}, reverse=True)
        kinds = [k for k in self.kinds if (widths[0], k) in lookup]
        removed = [i for i, lv in enumerate(unit.levels) if lv.removed]
        if level.removed:
            return [lookup[(widths[-1], kinds[-1])]]
        t, w = kinds.index(level.kind), widths.index(level.kept)
        out = [lookup[(level.kept, kinds[t + d])] for d in (-1, 1) if 0 <= t + d < len(kinds)]
        out += [lookup[(widths[w + d], level.kind)] for d in (-1, 1) if 0 <= w + d < len(widths)]
        return out + removed

    def cheaper_move(self, index: int, level_index: int) -> int | None:
        """The gentlest step that makes unit ``index`` cheaper on a budget: a narrower type, else a narrower width,
        else removal; None when it is as cheap as it gets."""
        unit = self.units[index]
        current = unit.levels[level_index]
        def gentleness(i: int) -> tuple[int, int]:  # same width first, then narrower widths, removal last
            level = unit.levels[i]
            axis = 2 if level.removed else 0 if level.kept == current.kept else 1
            return axis, -unit.level_bytes(level)

        ranked = sorted(self.moves(index, level_index), key=gentleness)
        return next((i for i in ranked if self._cheaper(unit, unit.levels[i], current)), None)

    def repair(self, genome: Genome, rng: random.Random, keep: int | None = None) -> Genome | None:
        """Make random units (never ``keep``) one gentle step cheaper each (``cheaper_move``) until the genome fits;
        None when no unit can get cheaper any more."""
        genes = list(genome)
        while self.violation(tuple(genes)) > 0:
            options = {u: step for u in range(len(genes)) if u != keep
                       for step in [self.cheaper_move(u, genes[u])] if step is not None}
            if not options:
                return None
            unit = rng.choice(sorted(options))
            genes[unit] = options[unit]
        return tuple(genes)

    def _cheaper(self, unit: Unit, level: Level, than: Level) -> bool:
        cheaper = False
        if self.budgets.max_bytes is not None:
            cheaper |= unit.level_bytes(level) < unit.level_bytes(than)
        if self.budgets.target_speedup is not None:
            cheaper |= (self._unit_ms(unit, level) < self._unit_ms(unit, than) if self.typed_latency is not None
                        else level.kept < than.kept)
        return cheaper

    def describe(self, genome: Genome) -> dict[str, str]:
        return {u.name: u.levels[i].describe(self._unit_size(u)) for u, i in zip(self.units, genome)}

    def _unit_size(self, unit: Unit) -> int:
        return 1 if unit.kind == "mlp" else unit.linears["q"][0] // self.head_dim

    def size(self) -> float:
        """log10 of the number of genomes."""
        return sum(math.log10(len(u.levels)) for u in self.units)


def width_levels(total: int, fractions: Sequence[float], multiple: int) -> list[int]:
    """Kept counts for ``fractions`` of ``total`` units, in multiples of ``multiple`` (at least one multiple),
    largest first, distinct."""
    kept = {total}
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise BudgetError(f"Joint width levels are fractions in (0, 1] (got {fraction}).")
        kept.add(max(multiple, min(total, int(round(total * fraction / multiple)) * multiple)))
    return sorted(kept, reverse=True)


def build_space(model: nn.Module, kinds: Sequence[str], attention_fractions: Sequence[float],
                mlp_fractions: Sequence[float], removal: bool, budgets: Budgets, fixed_bytes: int,
                latency: LatencyTable | None = None, width_latency: LevelLatencyTable | None = None,
                types_change_speed: bool = False) -> JointSpace:
    """Every block's attention and MLP with their levels, best-first: full width at the widest type first.
    FFN widths are multiples of the largest block of the chosen types that fits the dense width (256 for
    k-quants), so a narrower ``ffn_down`` keeps the type, and its quantized rows are a prefix of the dense
    ones (the level bank relies on it). Under a speed budget alone every type but the widest is dropped, unless
    ``types_change_speed`` (llama.cpp's decode: each type has its own kernels)."""
    if not kinds:
        raise BudgetError("The joint search needs at least one GGUF type (--joint-types).")
    types = GGUFLevels(kinds).choices[::-1]  # validated, distinct, widest first
    if budgets.max_bytes is None and not types_change_speed:  # narrower types would save nothing: keep the widest
        types = types[:1]
    adapter = get_adapter(model)
    units: list[Unit] = []
    for block in range(adapter.num_blocks):
        attention, mlp = adapter.attention(block), adapter.mlp(block)
        if attention.removed or mlp.removed:
            raise BudgetError("The joint search starts from a model with every sublayer present.")
        geometry = adapter.head_geometry(block)
        hidden = int(model.config.hidden_size)
        per_group = geometry.group_size * geometry.head_dim
        kv_rows = geometry.head_dim
        groups = width_levels(geometry.num_kv_heads, attention_fractions, 1)
        linears = {"q": (per_group, hidden, "rows"), "k": (kv_rows, hidden, "rows"), "v": (kv_rows, hidden, "rows"),
                   "o": (hidden, per_group, "columns")}
        units.append(_unit(attention.name, block, "attention", geometry.num_kv_heads, groups, types, removal, linears))
        width = adapter.ffn_width(block)
        multiple = max([gguf_type(k).block for k in types if gguf_type(k).fits(width)] + [8])
        channels = width_levels(width, mlp_fractions, multiple)
        linears = {"gate": (1, hidden, "rows"), "up": (1, hidden, "rows"), "down": (hidden, 1, "columns")}
        units.append(_unit(mlp.name, block, "mlp", width, channels, types, removal, linears))
    head_dim = adapter.head_geometry(0).head_dim
    return JointSpace(units, budgets, int(model.config.hidden_size), head_dim, fixed_bytes, latency, width_latency,
                      list(types))


def _unit(name: str, block: int, kind: str, total: int, kept: list[int], types: list[str], removal: bool,
          linears: dict) -> Unit:
    levels = [Level(k, t) for k in kept for t in types]  # widest first, then narrower types
    if removal:
        levels.append(Level(0))
    return Unit(name, block, kind, total, levels, linears)
