"""What a width search optimises: a fast accuracy proxy plus the cost model's deployment proxies.

``WidthProxy`` scores a candidate without rebuilding the model: the units a candidate drops (the least
important by the run's importance scores) are zeroed at the input of o_proj / down_proj, which is exactly
what slicing them away computes, and perplexity is measured on a small fixed token set. Scores are cached
per candidate, so a search's cost grows with the distinct candidates it visits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, Field
from torch import nn

from ..cost.analytic import PROXIES, ModelDims, estimate_costs
from ..evaluate.perplexity import token_set_perplexity
from ..models.adapter import get_adapter
from ..profile.width import WidthScores, group_rows
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
        self.masks: dict[tuple[str, int], torch.Tensor] = {}
        self.handles: list = []
        self.cache: dict[tuple, float] = {}
        self.evaluations = 0

    def __enter__(self) -> "WidthProxy":
        for block in range(self.adapter.num_blocks):
            attention, mlp = self.adapter.attention(block), self.adapter.mlp(block)
            if block in self.scores.groups and not attention.removed:
                self._mask_input(attention.linears["o"], ("groups", block))
            if block in self.scores.channels and not mlp.removed:
                self._mask_input(mlp.linears["down"], ("channels", block))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _mask_input(self, linear: nn.Linear, key: tuple[str, int]) -> None:
        mask = torch.ones(linear.in_features, device=self.device, dtype=linear.weight.dtype)
        self.masks[key] = mask
        self.handles.append(linear.register_forward_pre_hook(lambda _m, args, mask=mask: (args[0] * mask,)))

    def _set(self, widths: Widths) -> None:
        for (kind, block), mask in self.masks.items():
            mask.fill_(1.0)
            if kind == "groups" and block in widths.groups:
                for group in self.scores.ranked_groups(block)[widths.groups[block]:]:
                    mask[group_rows(self.adapter, block, group)[0]] = 0.0
            elif kind == "channels" and block in widths.channels:
                dropped = self.scores.ranked_channels(block)[widths.channels[block]:]
                mask[torch.tensor(dropped, dtype=torch.long, device=self.device)] = 0.0

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
