"""Structured width op: physically slice q/k/v/o (whole KV groups) and gate/up/down (channels), so
each block keeps its own head count and FFN width. The per-layer widths are written into the config
(``layerwise_layer_dims``), and a saved model reloads by replaying the slices on shapes alone."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator
from torch import nn

from ..calibration.width import WIDTH_SCORERS
from ..errors import PlanError
from ..models.adapter import ModelAdapter, Sublayer, get_adapter
from ..models.width import keep_units
from ..plan import ACTIONS, Action
from .base import OP_METHODS, OP_UNITS, OPS, STRUCTURE_REPLAY, ApplyContext
from .depth import present_sublayers


class SliceAction(Action):
    """Keep ``keep`` width units of one sublayer: query heads of an attention sublayer (whole KV groups, so a
    multiple of the group size), or channels of an MLP. ``kept`` lists which (KV-group indices, or channel
    indices), as the planner's ``method`` (taylor or act) ranked them; plans without it rank again on the
    calibration data when applied. The rest are sliced away for real."""

    structural: ClassVar[bool] = True
    op: Literal["slice"] = "slice"
    keep: int = Field(ge=1)
    method: str = "taylor"
    seq_len: Optional[int] = Field(None, ge=2, description="taylor: calibration sequence length")
    kept: Optional[list[int]] = Field(None, description="indices of the KV groups (attention) or channels (MLP) kept")

    @model_validator(mode="after")
    def _kept_are_distinct(self) -> "SliceAction":
        if self.kept is not None and (len(set(self.kept)) != len(self.kept) or min(self.kept, default=0) < 0):
            raise ValueError("kept lists distinct non-negative unit indices")
        return self


ACTIONS.add("slice", SliceAction)


OP_UNITS.add("slice", (present_sublayers, "an attention or MLP sublayer"))
OP_METHODS["slice"] = WIDTH_SCORERS


def slice_attention(adapter: ModelAdapter, block: int, groups: list[int]) -> None:
    """Keep the KV groups ``groups`` of ``block`` (their KV heads and the query heads sharing them), in the
    order given (the joint search's plans list them by importance, as its level bank computed them)."""
    sublayer = adapter.attention(block)
    keep_units(sublayer.module, adapter.attention_layout(block), list(groups))
    adapter.fit_heads(block)


def slice_mlp(adapter: ModelAdapter, block: int, channels: list[int]) -> None:
    """Keep the FFN channels ``channels`` of ``block``, in the order given."""
    sublayer = adapter.mlp(block)
    keep_units(sublayer.module, adapter.mlp_layout(block), list(channels))


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
        count, available, noun = action.keep // geometry.group_size, geometry.num_kv_heads, "KV groups"
    else:
        count, available, noun = action.keep, adapter.ffn_width(sublayer.block), "channels"
        if count > available:
            raise PlanError(f"The plan keeps {action.keep} channels of {action.unit}, which has only {available}.")
    if action.kept is not None and (len(action.kept) != count or max(action.kept, default=-1) >= available):
        raise PlanError(f"The plan lists {len(action.kept)} kept {noun} of {action.unit} (largest index "
                        f"{max(action.kept, default=-1)}), but keeps {count} of its {available}.")
    return sublayer, count


@OPS.register("slice")
def slice_op(model: nn.Module, actions: list[Action], context: ApplyContext) -> None:
    """Slice every action's sublayer to the units it lists as kept; actions of older plans that list none
    keep the best ``keep`` by their method's scores on the calibration data (scored once per method)."""
    adapter = get_adapter(model)
    checked = [(action, *_check_keep(adapter, action)) for action in actions]
    scores = {}
    for action, _, _ in checked:
        key = (action.method, action.seq_len)
        if action.kept is None and key not in scores:
            options = {"seq_len": action.seq_len} if action.seq_len else {}
            scores[key] = context.require_calibration().width_scores(action.method, **options)
    for action, sublayer, count in checked:
        ranked = scores.get((action.method, action.seq_len))
        if sublayer.kind == "attention":
            kept = action.kept if action.kept is not None else sorted(ranked.ranked_groups(sublayer.block)[:count])
            slice_attention(adapter, sublayer.block, kept)
        else:
            kept = action.kept if action.kept is not None else sorted(ranked.ranked_channels(sublayer.block)[:count])
            slice_mlp(adapter, sublayer.block, kept)
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
