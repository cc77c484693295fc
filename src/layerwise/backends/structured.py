"""Structured width backend: physically slice q/k/v/o (whole KV groups) and gate/up/down (channels), so
each block keeps its own head count and FFN width. The per-layer widths are written into the config
(``layerwise_layer_dims``), and a saved model reloads by replaying the slices on shapes alone."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PlanError
from ..models.adapter import ModelAdapter, Sublayer, get_adapter
from ..plan import Action
from ..profile.width import WIDTH_SCORERS
from .base import OP_METHODS, OP_UNITS, OPS, STRUCTURE_REPLAY, ApplyContext
from .depth import present_sublayers

OP_UNITS.add("slice", (present_sublayers, "an attention or MLP sublayer present in"))
OP_METHODS["slice"] = WIDTH_SCORERS


def _take_rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[index.to(linear.weight.device)])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[index.to(linear.weight.device)])
    return new


def _take_columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, index.to(linear.weight.device)])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def _replace(adapter: ModelAdapter, sublayer: Sublayer, role: str, linear: nn.Linear) -> None:
    roles = adapter.attention_roles if sublayer.kind == "attention" else adapter.mlp_roles
    sublayer.module.set_submodule(roles[role], linear)


def slice_attention(adapter: ModelAdapter, block: int, groups: list[int]) -> None:
    """Keep the KV groups ``groups`` of ``block`` (their KV heads and the query heads sharing them)."""
    geometry = adapter.head_geometry(block)
    sublayer = adapter.attention(block)
    d, size = geometry.head_dim, geometry.group_size
    groups = sorted(groups)
    q_rows = torch.tensor([g * size * d + j for g in groups for j in range(size * d)], dtype=torch.long)
    kv_rows = torch.tensor([g * d + j for g in groups for j in range(d)], dtype=torch.long)
    linears = sublayer.linears
    for role, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
        _replace(adapter, sublayer, role, _take_rows(linears[role], rows))
    _replace(adapter, sublayer, "o", _take_columns(linears["o"], q_rows))


def slice_mlp(adapter: ModelAdapter, block: int, channels: list[int]) -> None:
    """Keep the FFN channels ``channels`` of ``block`` (gate/up rows, down columns)."""
    sublayer = adapter.mlp(block)
    index = torch.tensor(sorted(channels), dtype=torch.long)
    for role in ("gate", "up"):
        _replace(adapter, sublayer, role, _take_rows(sublayer.linears[role], index))
    _replace(adapter, sublayer, "down", _take_columns(sublayer.linears["down"], index))


def record_layer_dims(model: nn.Module) -> None:
    """Write every block's head count, KV heads and FFN width into the config (``layerwise_layer_dims``)."""
    adapter = get_adapter(model)
    dims = {"num_attention_heads": [], "num_key_value_heads": [], "intermediate_size": []}
    for index in range(adapter.num_blocks):
        attention, mlp = adapter.attention(index), adapter.mlp(index)
        geometry = None if attention.removed else adapter.head_geometry(index)
        dims["num_attention_heads"].append(geometry.num_heads if geometry else 0)
        dims["num_key_value_heads"].append(geometry.num_kv_heads if geometry else 0)
        dims["intermediate_size"].append(0 if mlp.removed else adapter.ffn_width(index))
    model.config.layerwise_layer_dims = dims


def _check_keep(adapter: ModelAdapter, action: Action) -> tuple[Sublayer, int]:
    """The sublayer and the number of its units (KV groups or channels) ``action`` keeps, or ``PlanError``."""
    sublayer = adapter.sublayer(action.unit)
    if sublayer.kind == "attention":
        geometry = adapter.head_geometry(sublayer.block)
        if action.keep % geometry.group_size or action.keep > geometry.num_heads:
            raise PlanError(f"The plan keeps {action.keep} heads of {action.unit}, which has {geometry.num_heads} "
                            f"in KV groups of {geometry.group_size}: keep a multiple of {geometry.group_size}.")
        return sublayer, action.keep // geometry.group_size
    if action.keep > adapter.ffn_width(sublayer.block):
        raise PlanError(f"The plan keeps {action.keep} channels of {action.unit}, which has only "
                        f"{adapter.ffn_width(sublayer.block)}.")
    return sublayer, action.keep


@OPS.register("slice")
def slice_op(model: nn.Module, actions: list[Action], context: ApplyContext) -> None:
    """Score the width units on the calibration data (once per method), then slice every action's sublayer."""
    adapter = get_adapter(model)
    checked = [(action, *_check_keep(adapter, action)) for action in actions]
    calibration = context.require_calibration()
    scores = {}
    for action, _, _ in checked:
        key = (action.method, action.seq_len)
        if key not in scores:
            options = {"seq_len": action.seq_len} if action.seq_len else {}
            scores[key] = calibration.width_scores(action.method, **options)
    for action, sublayer, count in checked:
        ranked = scores[(action.method, action.seq_len)]
        if sublayer.kind == "attention":
            slice_attention(adapter, sublayer.block, ranked.ranked_groups(sublayer.block)[:count])
        else:
            slice_mlp(adapter, sublayer.block, ranked.ranked_channels(sublayer.block)[:count])
    record_layer_dims(model)


def _replay(model: nn.Module, actions: list[Action]) -> None:
    """Shapes only: keep the first units, so the saved tensors load into matching modules."""
    adapter = get_adapter(model)
    for action in actions:
        sublayer, count = _check_keep(adapter, action)
        if sublayer.kind == "attention":
            slice_attention(adapter, sublayer.block, list(range(count)))
        else:
            slice_mlp(adapter, sublayer.block, list(range(count)))
    record_layer_dims(model)


STRUCTURE_REPLAY.add("slice", _replay)
