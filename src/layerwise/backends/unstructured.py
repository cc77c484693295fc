"""Unstructured sparsity backends (``op: sparsify``), one registered method each."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from ..plan import SparsifyAction
from ..registry import Registry
from .base import OPS, ApplyContext
from .masks import count_for, prune_lowest

Sparsifier = Callable[[nn.Module, list[SparsifyAction], ApplyContext], None]
SPARSIFIERS: Registry[Sparsifier] = Registry("sparsity method")


@OPS.register("sparsify")
def apply_sparsify(model: nn.Module, actions: list[SparsifyAction], context: ApplyContext) -> None:
    by_method: dict[str, list[SparsifyAction]] = defaultdict(list)
    for action in actions:
        by_method[action.method].append(action)
    for method, group in by_method.items():
        SPARSIFIERS.get(method)(model, group, context)


@SPARSIFIERS.register("magnitude")
@torch.no_grad()
def magnitude(model: nn.Module, actions: list[SparsifyAction], context: ApplyContext) -> None:
    """Zero the smallest-|w| weights of each matrix, threshold per matrix (exact count)."""
    for action in actions:
        weight = model.get_submodule(action.unit).weight
        prune_lowest(weight.data, weight.data.abs(), count_for(action.ratio, weight.numel()))
