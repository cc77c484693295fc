"""Importance of width units: each block's KV groups (a KV head with the query heads sharing it) and FFN
channels. Heads are scored and removed in whole KV groups, so grouped-query attention stays consistent.

- ``taylor`` (LLM-Pruner, element-wise first order): Σ |w · ∂L/∂w| over every weight of the unit, the
  causal-LM loss summed over short calibration sequences;
- ``act`` (gradient-free): Σ over the unit's output-projection columns of ‖X_col‖₂ · ‖W_col‖₂, from the
  Profile's input norms of the output projection (o_proj / down_proj; Wanda's score, summed per structure).

Which weights a unit owns comes from the family's width layout (``models.width``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.adapter import ModelAdapter, Sublayer, get_adapter
from ..registry import Registry
from .blockwise import BlockwiseRunner


@dataclass
class WidthScores:
    """Per block: one score per KV group and one per FFN channel (higher = more important)."""

    groups: dict[int, torch.Tensor]
    channels: dict[int, torch.Tensor]

    def ranked_groups(self, block: int) -> list[int]:
        """KV groups of ``block``, most important first (ties: lower index first)."""
        return _ranked(self.groups[block])

    def ranked_channels(self, block: int) -> list[int]:
        return _ranked(self.channels[block])


def _ranked(scores: torch.Tensor) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))


def attention_group_sum(adapter: ModelAdapter, block: int, per_weight: Callable[[nn.Linear], torch.Tensor]) -> torch.Tensor:
    """Σ of ``per_weight(linear)`` (a tensor shaped like the weight) over each KV group's weights."""
    return adapter.attention_layout(block).unit_sums(adapter.attention(block).module, per_weight)


def mlp_channel_sum(adapter: ModelAdapter, block: int, per_weight: Callable[[nn.Linear], torch.Tensor]) -> torch.Tensor:
    """Σ of ``per_weight`` over each FFN channel's weights (its gate/up rows and down column)."""
    return adapter.mlp_layout(block).unit_sums(adapter.mlp(block).module, per_weight)


WidthScorer = Callable[..., WidthScores]
WIDTH_SCORERS: Registry[WidthScorer] = Registry("width importance")


@WIDTH_SCORERS.register("taylor")
def taylor_scores(model: nn.Module, calibration: Any, seq_len: int = 64, **_: Any) -> WidthScores:
    """First-order Taylor importance on the calibration windows cut to ``seq_len`` tokens."""
    adapter = get_adapter(model)
    tokens = calibration.tokens()[:, :seq_len]
    device = next(model.parameters()).device
    batch_size = calibration.settings.calib_batch_size
    linears = [linear for i in range(adapter.num_blocks) for s in adapter.sublayers(i) for linear in s.linears.values()]
    flags = {p: p.requires_grad for p in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for linear in linears:
        linear.weight.requires_grad_(True)
        linear.weight.grad = None
    was_training = model.training
    model.eval()
    try:
        batches = tokens.split(batch_size)
        for batch in tqdm(batches, desc="taylor importance", unit="batch", disable=None, leave=False):
            batch = batch.to(device)
            with torch.enable_grad():  # callers may hold no_grad; the scores need the backward pass
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss * len(batch)
                loss.backward()
        with torch.no_grad():
            salience = lambda linear: (linear.weight * linear.weight.grad).abs()  # noqa: E731
            return _score_all(adapter, salience)
    finally:
        for linear in linears:
            linear.weight.grad = None
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        model.train(was_training)


@WIDTH_SCORERS.register("act")
def activation_scores(model: nn.Module, calibration: Any, **_: Any) -> WidthScores:
    """‖X_col‖·‖W_col‖ of each output-projection column (o_proj per head dim, down_proj per channel), summed."""
    adapter = get_adapter(model)
    profile = calibration.profile()

    def unit_scores(sublayer: Sublayer) -> torch.Tensor:
        layout = adapter.layout(sublayer)
        output = layout.output
        linear = sublayer.module.get_submodule(output.module)
        norms = profile.feature_norms(f"{sublayer.name}.{output.module}").to(torch.float64)
        columns = norms * linear.weight.detach().double().norm(dim=0).cpu()
        return torch.stack([columns[output.index([unit])].sum() for unit in range(layout.units)])

    groups, channels = {}, {}
    for block in range(adapter.num_blocks):
        attention, mlp = adapter.attention(block), adapter.mlp(block)
        if not attention.removed:
            groups[block] = unit_scores(attention)
        if not mlp.removed:
            channels[block] = unit_scores(mlp)
    return WidthScores(groups, channels)


def _score_all(adapter: ModelAdapter, per_weight: Callable[[nn.Linear], torch.Tensor]) -> WidthScores:
    groups, channels = {}, {}
    for block in range(adapter.num_blocks):
        if not adapter.attention(block).removed:
            groups[block] = attention_group_sum(adapter, block, per_weight)
        if not adapter.mlp(block).removed:
            channels[block] = mlp_channel_sum(adapter, block, per_weight)
    return WidthScores(groups, channels)


@torch.no_grad()
def block_similarity(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8) -> dict[int, float]:
    """Mean cosine similarity between each block's input and output hidden states over calibration tokens."""

    runner = BlockwiseRunner(model, calibration, batch_size)
    similarity = {}
    for index in runner.progress("block similarity"):
        outputs = runner.forward(index)
        total, count = 0.0, 0
        for before, after in zip(runner.inputs, outputs):
            cosine = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
            total += float(cosine.sum())
            count += cosine.numel()
        similarity[index] = total / max(1, count)
        runner.advance(outputs)
    return similarity
