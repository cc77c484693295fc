"""What a width search optimises: a fast accuracy proxy plus the cost model's deployment proxies.

``WidthProxy`` scores a candidate without rebuilding the model: the units a candidate drops (the least
important by the run's importance scores) are zeroed at the input of the output projection, which is exactly
what slicing them away computes, and perplexity is measured on a small fixed token set. Scores are cached
per candidate, so a search's cost grows with the distinct candidates it visits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, Field
from torch import nn

from ..calibration.width import WidthScores
from ..cost.analytic import PROXIES, ModelDims, estimate_costs
from ..evaluate.perplexity import token_set_perplexity
from ..models.adapter import get_adapter
from ..models.width import UnitMask
from .width import Widths, WidthSpace


class RewardWeights(BaseModel):
    """reward = w_acc·accuracy − α·FLOPs − β·bytes − γ·peak activation − δ·KV cache (costs over dense's)."""

    w_acc: float = Field(1.0, ge=0.0)
    alpha: float = Field(0.2, ge=0.0)
    beta: float = Field(0.6, ge=0.0)
    gamma: float = Field(0.2, ge=0.0)
    delta: float = Field(0.4, ge=0.0)

    def cost_weights(self) -> dict[str, float]:
        return dict(zip(PROXIES, (self.alpha, self.beta, self.gamma, self.delta)))


class WidthProxy:
    """Perplexity of candidate widths on ``tokens``, by masking pruned units (use as a context manager)."""

    def __init__(self, model: nn.Module, scores: WidthScores, tokens: torch.Tensor, batch_size: int = 4) -> None:
        self.model, self.scores, self.tokens, self.batch_size = model, scores, tokens, batch_size
        self.adapter = get_adapter(model)
        self.device = next(model.parameters()).device
        self.masks: dict[tuple[str, int], UnitMask] = {}
        self.cache: dict[tuple, float] = {}
        self.evaluations = 0

    def __enter__(self) -> "WidthProxy":
        for block in range(self.adapter.num_blocks):
            for key, sublayer, scored in ((("groups", block), self.adapter.attention(block), self.scores.groups),
                                          (("channels", block), self.adapter.mlp(block), self.scores.channels)):
                if block in scored and not sublayer.removed:
                    self.masks[key] = UnitMask(sublayer.module, self.adapter.layout(sublayer))
        return self

    def __exit__(self, *exc: object) -> None:
        for mask in self.masks.values():
            mask.remove()
        self.masks.clear()

    def _set(self, widths: Widths) -> None:
        for (kind, block), mask in self.masks.items():
            kept = (widths.groups if kind == "groups" else widths.channels).get(block)
            ranked = self.scores.ranked_groups(block) if kind == "groups" else self.scores.ranked_channels(block)
            mask.set(ranked[kept:] if kept is not None else [])

    def perplexity(self, widths: Widths) -> float:
        key = (tuple(sorted(widths.groups.items())), tuple(sorted(widths.channels.items())))
        if key not in self.cache:
            self._set(widths)
            self.cache[key] = token_set_perplexity(self.model, self.tokens, self.batch_size)
            self.evaluations += 1
        return self.cache[key]


@dataclass
class Objective:
    """The mixed objective of a candidate: w_acc·accuracy − Σ weight·cost, where accuracy = −ln(PPL/PPL_dense)
    (minus the rise in mean token NLL, 0 for the dense model; a ratio PPL_dense/PPL would flatten to 0 for every
    badly pruned candidate and leave the search no signal) and each cost is over the dense model's."""

    space: WidthSpace
    proxy: WidthProxy
    weights: RewardWeights
    dense_dims: ModelDims
    setting: dict[str, int]
    dense_ppl: float = field(init=False)

    def __post_init__(self) -> None:
        self.dense_costs = estimate_costs(self.dense_dims, **self.setting)
        self.dense_ppl = self.proxy.perplexity(self.space.dense())

    def terms(self, widths: Widths) -> dict[str, float]:
        dims = self.dense_dims.with_widths(widths.groups, widths.channels)
        costs = estimate_costs(dims, **self.setting).normalised(self.dense_costs)
        ppl = self.proxy.perplexity(widths)
        accuracy = -math.log(ppl / self.dense_ppl)
        value = self.weights.w_acc * accuracy - sum(w * costs[name] for name, w in self.weights.cost_weights().items())
        return {"value": value, "accuracy": accuracy, "proxy_ppl": ppl, **costs}
