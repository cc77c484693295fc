"""Unstructured sparsity ops (``op: sparsify``), one registered method each."""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
from pydantic import Field
from torch import nn

from ..calibration.stats import InputStats, attach_input_stats
from ..plan import ACTIONS, Action
from ..registry import Registry
from .base import OP_METHODS, OPS, ApplyContext, dispatch_by_method, sequential_pass
from .masks import check_nm, count_for, prune_lowest, prune_lowest_per_row, prune_nm


class SparsifyAction(Action):
    """Zero ``ratio`` of one linear's weights, chosen by ``method`` (magnitude, ...)."""

    op: Literal["sparsify"] = "sparsify"
    ratio: float = Field(ge=0.0, lt=1.0)
    method: str = "magnitude"
    pattern: Optional[str] = Field(None, pattern=r"^\d+:\d+$", description="N:M semi-structured, e.g. 2:4")

    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern: N of every M consecutive input weights are zeroed."""
        if self.pattern is None:
            return None
        n, m = (int(x) for x in self.pattern.split(":"))
        return n, m


ACTIONS.add("sparsify", SparsifyAction)


Sparsifier = Callable[[nn.Module, list[SparsifyAction], ApplyContext], None]
SPARSIFIERS: Registry[Sparsifier] = Registry("sparsity method")
OP_METHODS["sparsify"] = SPARSIFIERS


@OPS.register("sparsify")
def apply_sparsify(model: nn.Module, actions: list[SparsifyAction], context: ApplyContext) -> None:
    dispatch_by_method(SPARSIFIERS, model, actions, context)


@SPARSIFIERS.register("magnitude")
@torch.no_grad()
def magnitude(model: nn.Module, actions: list[SparsifyAction], context: ApplyContext) -> None:
    """Zero the smallest-|w| weights of each matrix, threshold per matrix (exact count)."""
    for action in actions:
        weight = model.get_submodule(action.unit).weight
        _prune(weight.data, weight.data.abs(), action, per_row=False)


@SPARSIFIERS.register("wanda")
@torch.no_grad()
def wanda(model: nn.Module, actions: list[SparsifyAction], context: ApplyContext) -> None:
    """Wanda as its paper and code do it: block by block, each block's input norms measured on the outputs
    of the blocks already pruned; score |W_ij|·‖X_j‖₂ and prune the lowest per output row."""

    def attach(linears: dict[str, nn.Linear]) -> tuple[dict[str, InputStats], list]:
        statistics: dict[str, InputStats] = {}
        return statistics, attach_input_stats(linears, statistics)

    def prune(linear: nn.Module, action: SparsifyAction, statistics: InputStats) -> None:
        norms = statistics.feature_norms().to(linear.weight.device, torch.float32)
        _prune(linear.weight.data, linear.weight.data.abs().float() * norms[None, :], action, per_row=True)

    sequential_pass(model, actions, context, "wanda", attach, prune)


@SPARSIFIERS.register("wanda-one-pass", "wanda_one_pass")
@torch.no_grad()
def wanda_one_pass(model: nn.Module, actions: list[SparsifyAction], context: ApplyContext) -> None:
    """Wanda's score with every norm from one profile of the unpruned model (faster, cached; not sequential)."""
    profile = context.require_calibration().profile()
    for action in actions:
        weight = model.get_submodule(action.unit).weight
        norms = profile.feature_norms(action.unit).to(weight.device, torch.float32)
        _prune(weight.data, weight.data.abs().float() * norms[None, :], action, per_row=True)


def _prune(weight: torch.Tensor, scores: torch.Tensor, action: SparsifyAction, per_row: bool) -> None:
    pattern = action.nm()
    if pattern is not None:
        check_nm(pattern, weight.shape[1], action.unit)
        prune_nm(weight, scores, pattern)
    elif per_row:
        prune_lowest_per_row(weight, scores, count_for(action.ratio, weight.numel()))
    else:
        prune_lowest(weight, scores, count_for(action.ratio, weight.numel()))
