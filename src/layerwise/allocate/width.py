"""Width allocation: how many KV groups and FFN channels each block keeps under a global pruning ratio.

The budget is a fraction of the *eligible* parameters (attention weights of ``attn_layers``, MLP weights of
``mlp_layers``) to remove. ``fit_budget`` turns any wished-for per-layer keep fractions into integer widths
whose removed parameters match the target within one rounding unit (``multiple`` FFN channels); every
width allocator ends with it, so all are compared at the same budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..errors import BudgetError
from ..models.adapter import get_adapter
from ..registry import Registry


@dataclass(frozen=True)
class Widths:
    """Kept KV groups per eligible attention block and kept FFN channels per eligible MLP block."""

    groups: dict[int, int]
    channels: dict[int, int]

    def moved(self, kind: str, source: int, target: int, amount: int) -> "Widths":
        """A copy with ``amount`` units (groups or channels) moved from block ``source`` to ``target``."""
        table = dict(self.groups if kind == "groups" else self.channels)
        table[source] -= amount
        table[target] += amount
        return Widths(table, self.channels) if kind == "groups" else Widths(self.groups, table)

    def as_lists(self, blocks: int) -> dict[str, list[int | None]]:
        return {"groups": [self.groups.get(i) for i in range(blocks)],
                "channels": [self.channels.get(i) for i in range(blocks)]}


@dataclass(frozen=True)
class WidthSpace:
    """The eligible units of a model and the parameter budget to remove from them."""

    num_blocks: int
    groups: dict[int, int]  # dense KV groups per eligible attention block
    channels: dict[int, int]  # dense FFN width per eligible MLP block
    group_params: int  # weights of one KV group (its q/k/v rows and o columns)
    channel_params: int  # weights of one FFN channel (gate and up rows, down column)
    group_size: dict[int, int]  # query heads per KV group
    ratio: float
    multiple: int = 8

    @classmethod
    def from_model(cls, model: nn.Module, ratio: float, attn_layers: range | None = None,
                   mlp_layers: range | None = None, multiple: int = 8) -> "WidthSpace":
        adapter = get_adapter(model)
        blocks = range(adapter.num_blocks)
        attn = [i for i in (attn_layers if attn_layers is not None else blocks) if not adapter.attention(i).removed]
        mlp = [i for i in (mlp_layers if mlp_layers is not None else blocks) if not adapter.mlp(i).removed]
        geometry = {i: adapter.head_geometry(i) for i in attn}
        # what one unit weighs, from the eligible blocks (or any block with that sublayer, when none is eligible)
        present = [i for i in blocks if not adapter.attention(i).removed]
        group_params = {adapter.attention_layout(i).parameters_per_unit(adapter.attention(i).module)
                        for i in (attn or present[:1])}
        if len(group_params) > 1:
            raise BudgetError("Width pruning needs the same KV-group size in every eligible attention block.")
        present = [i for i in blocks if not adapter.mlp(i).removed]
        channel_params = {adapter.mlp_layout(i).parameters_per_unit(adapter.mlp(i).module)
                          for i in (mlp or present[:1])}
        space = cls(
            num_blocks=adapter.num_blocks,
            groups={i: geometry[i].num_kv_heads for i in attn},
            channels={i: adapter.ffn_width(i) for i in mlp},
            group_params=group_params.pop() if group_params else 0,  # its q/k/v rows and o columns
            channel_params=channel_params.pop() if channel_params else 0,  # its gate/up rows and down column
            group_size={i: geometry[i].group_size for i in attn},
            ratio=ratio,
            multiple=multiple,
        )
        space.check()
        return space

    @property
    def eligible_parameters(self) -> int:
        return sum(self.groups.values()) * self.group_params + sum(self.channels.values()) * self.channel_params

    @property
    def target_removed(self) -> int:
        return round(self.ratio * self.eligible_parameters)

    @property
    def rounding_unit(self) -> int:
        """Parameters of the smallest step the budget can move by: ``multiple`` channels (or one KV group)."""
        return self.multiple * self.channel_params if self.channels else self.group_params

    def removed(self, widths: Widths) -> int:
        return (sum(self.groups[i] - widths.groups[i] for i in self.groups) * self.group_params
                + sum(self.channels[i] - widths.channels[i] for i in self.channels) * self.channel_params)

    @property
    def blocks(self) -> list[int]:
        """Blocks with any eligible unit, in order."""
        return sorted(set(self.groups) | set(self.channels))

    def layer_max_removal(self, block: int) -> int:
        """The most one block can give: all but one KV group and all but ``multiple`` FFN channels."""
        groups, channels = self.groups.get(block), self.channels.get(block)
        return ((groups - 1) * self.group_params if groups else 0) + \
               ((channels - self.multiple) * self.channel_params if channels else 0)

    def max_removable(self) -> int:
        return sum(self.layer_max_removal(block) for block in self.blocks)

    def check(self) -> None:
        if not self.groups and not self.channels:
            raise BudgetError("No eligible layers: --attn-layers and --mlp-layers select nothing to prune.")
        if not 0.0 < self.ratio < 1.0:
            raise BudgetError(f"--pruning-ratio must lie in (0, 1) (got {self.ratio}).")
        if self.target_removed > self.max_removable():
            most = self.max_removable() / self.eligible_parameters
            raise BudgetError(f"--pruning-ratio {self.ratio} cannot be reached: every layer keeps one KV group and "
                              f"{self.multiple} FFN channels, so at most {most:.3f} of the eligible parameters go.")

    def dense(self) -> Widths:
        return Widths(dict(self.groups), dict(self.channels))


def fit_budget(space: WidthSpace, head_keep: dict[int, float], ffn_keep: dict[int, float]) -> Widths:
    """Integer widths near the wished keep fractions whose removed parameters equal the target within one
    rounding unit. KV groups are rounded first, as a whole: the wished number of groups to drop is shared out
    by largest remainders (so many layers near half a group do not all round the same way, while equal wishes
    round alike), at least one kept per layer; FFN channels absorb the rest in multiples of ``space.multiple``, in proportion to each
    layer's wished removal."""
    wished_groups = {i: max(0.0, (1.0 - head_keep.get(i, 1.0)) * g) for i, g in space.groups.items()}
    dropped = _spread(round(sum(wished_groups.values())), wished_groups, {i: g - 1 for i, g in space.groups.items()},
                      whole_ties=True)
    groups = {i: g - dropped[i] for i, g in space.groups.items()}
    capacity = sum((c - space.multiple) // space.multiple for c in space.channels.values()) * space.multiple
    capacity_params = capacity * space.channel_params

    def need() -> int:  # parameters the FFN must still remove
        return space.target_removed - sum(space.groups[i] - groups[i] for i in groups) * space.group_params

    wish = {i: head_keep.get(i, 1.0) * g for i, g in space.groups.items()}
    # Groups are coarse: with FFN channels present they only ever leave the FFN a non-negative share it
    # can hold; without, they alone get as close to the target as one group allows.
    low, high = (0, capacity_params) if space.channels else (-space.group_params / 2, space.group_params / 2)
    while need() < low:
        grow = [i for i in groups if groups[i] < space.groups[i]]
        groups[max(grow, key=lambda i: (wish[i] - groups[i], -i))] += 1
    while need() > high:
        shrink = [i for i in groups if groups[i] > 1]
        if not shrink:
            break
        groups[max(shrink, key=lambda i: (groups[i] - wish[i], i))] -= 1
    units = max(0, round(need() / (space.multiple * space.channel_params)))
    removable = {i: (c - space.multiple) // space.multiple for i, c in space.channels.items()}
    wished = {i: max(0.0, (1.0 - ffn_keep.get(i, 1.0)) * c / space.multiple) for i, c in space.channels.items()}
    taken = _spread(units, wished, removable)
    channels = {i: c - taken[i] * space.multiple for i, c in space.channels.items()}
    return Widths(groups, channels)


def _spread(units: int, wished: dict[int, float], limits: dict[int, int], whole_ties: bool = False) -> dict[int, int]:
    """Integers summing to ``units``, each within ``limits``, in proportion to ``wished``: water-filling
    (a layer that would pass its limit is capped and the rest re-shared), then largest remainders.

    With ``whole_ties`` layers with equal remainders round the same way (all up or, when that is no nearer
    the total, all down), so equal wishes give equal integers; the sum may then miss ``units``."""
    units = min(units, sum(limits.values()))
    share = {i: 0.0 for i in wished}
    free = {i for i in wished if limits[i] > 0}
    left = float(units)
    while free and left > 1e-9:
        total = sum(wished[i] for i in free)
        weights = {i: wished[i] / total if total > 0 else 1.0 / len(free) for i in free}
        over = {i for i in free if share[i] + left * weights[i] > limits[i]}
        if not over:
            for i in free:
                share[i] += left * weights[i]
            break
        for i in over:
            share[i] = float(limits[i])
        free -= over
        left = units - sum(share.values())
    counts = {i: min(limits[i], math.floor(share[i] + 1e-9)) for i in share}
    remainders = {i: round(share[i] - counts[i], 9) for i in share}
    shortfall = units - sum(counts.values())
    for remainder in sorted(set(remainders.values()), reverse=True):
        if shortfall <= 0:
            break
        tied = [i for i in sorted(share) if remainders[i] == remainder and counts[i] < limits[i]]
        if len(tied) > shortfall and whole_ties:
            if len(tied) - shortfall < shortfall:  # all up is nearer the total than all down
                for i in tied:
                    counts[i] += 1
            break
        for i in tied[:shortfall]:
            counts[i] += 1
        shortfall -= min(shortfall, len(tied))
    return counts


@dataclass
class WidthContext:
    """What a width allocator reads: the model (shapes, never changed), the space, importance, calibration."""

    model: nn.Module
    space: WidthSpace
    calibration: Any
    scores: Any  # WidthScores of the run's importance method
    seed: int = 0
    cost_setting: dict[str, int] = field(default_factory=lambda: {"tokens": 128, "batch": 1, "generated": 32})


@dataclass
class WidthAllocation:
    widths: Widths
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


WidthAllocator = Callable[..., WidthAllocation]
WIDTH_ALLOCATORS: Registry[WidthAllocator] = Registry("width allocator")


def timed_allocation(function: WidthAllocator) -> WidthAllocator:
    """Record the allocator's wall time as the search time."""

    def run(context: WidthContext, **params: Any) -> WidthAllocation:
        start = time.perf_counter()
        allocation = function(context, **params)
        allocation.seconds = round(time.perf_counter() - start, 3)
        return allocation

    run.__wrapped__ = function  # inspect.signature follows it, so option checks see the real parameters
    run.__doc__ = function.__doc__
    return run


@WIDTH_ALLOCATORS.register("uniform")
@timed_allocation
def uniform_widths(context: WidthContext) -> WidthAllocation:
    """Every eligible layer keeps the same fraction of its heads and FFN channels."""
    keep = 1.0 - context.space.ratio
    space = context.space
    widths = fit_budget(space, {i: keep for i in space.groups}, {i: keep for i in space.channels})
    return WidthAllocation(widths)
