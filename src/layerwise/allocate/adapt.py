"""``adapt``: Adapt-Pruner-style width allocation. A block whose output stays close to its input (high
cosine similarity on calibration tokens) matters less and is pruned more; each layer's ratio lies within
``± adapt_amplitude`` of the global ratio before the budget projection makes the total exact."""

from __future__ import annotations

from typing import Optional

from ..calibration.width import block_similarity
from ..component_options import ComponentOptions, declares, option
from .width import WIDTH_ALLOCATORS, WidthAllocation, WidthContext, fit_budget, timed_allocation


def adapt_keep_fractions(context: WidthContext, adapt_amplitude: float) -> tuple[dict[int, float], dict[int, float]]:
    """Per-block keep fraction (heads and FFN alike) from the blocks' input/output similarity."""
    settings = context.calibration.settings
    similarity = block_similarity(context.model, context.calibration.tokens(), settings.calib_batch_size)
    importance = {i: 1.0 - s for i, s in similarity.items()}  # Adapt-Pruner: -cos, shifted to be positive
    lo, hi = min(importance.values()), max(importance.values())
    mean = sum(importance.values()) / len(importance)
    span = hi - lo if hi > lo else 1.0
    ratio = context.space.ratio
    layer_ratio = {i: min(0.95, max(0.0, ratio - adapt_amplitude * (v - mean) / span * 2))
                   for i, v in importance.items()}
    keep = {i: 1.0 - r for i, r in layer_ratio.items()}
    return keep, importance


class AdaptOptions(ComponentOptions):
    """The adaptive heuristic: how far a layer's ratio may move from the global one."""

    adapt_amplitude: Optional[float] = option("adapt/rl-refine: layer ratios within +- this of the global one "
                                              "(default 0.2).")

@declares(AdaptOptions)
@WIDTH_ALLOCATORS.register("adapt")
@timed_allocation
def adapt_widths(context: WidthContext, adapt_amplitude: float = 0.2) -> WidthAllocation:
    """Less important layers (by input/output similarity) keep less, within the amplitude."""
    keep, importance = adapt_keep_fractions(context, adapt_amplitude)
    space = context.space
    widths = fit_budget(space, {i: keep[i] for i in space.groups}, {i: keep[i] for i in space.channels})
    return WidthAllocation(widths, {"adapt_amplitude": adapt_amplitude},
                           {"layer_importance": [round(importance[i], 6) for i in sorted(importance)]})
