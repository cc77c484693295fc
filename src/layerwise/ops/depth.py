"""Depth op: delete whole attention or MLP sublayers (the residual path stays), for real.

A removed sublayer's module and pre-norm are replaced by parameter-free stand-ins, so its weights
leave the state dict and its compute leaves the forward pass; ``temporarily_removed`` does the same
reversibly, for latency tables and sensitivity searches that try removals without copying the model.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Iterable, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..calibration.sublayers import SublayerStream
from ..errors import PlanError
from ..models.adapter import get_adapter
from ..plan import ACTIONS, Action
from .base import OP_UNITS, OPS, STRUCTURE_REPLAY, ApplyContext
from .tuning import tune_for_removal


class TuneSpec(BaseModel):
    """In-compression tuning done with a removal: refit ``ratio`` of ``unit``'s input columns (``in_channel``)
    or output rows (``out_channel``, SPRINT's reference) by least squares on the calibration data, damped
    relative to the mean diagonal of XᵀX or, with ``damping_relative`` false, absolutely as the reference.
    The defaults are what plans written before these fields existed did."""

    model_config = ConfigDict(extra="forbid")
    unit: str
    ratio: float = Field(gt=0.0, le=1.0)
    damping: float = Field(0.01, ge=0.0)
    direction: Literal["out_channel", "in_channel"] = "in_channel"
    damping_relative: bool = True


class RemoveAction(Action):
    """Delete one attention or MLP sublayer (``model.layers.7.self_attn``); the residual path stays.
    Removals apply in plan order, so a ``tune`` step sees the model as the search saw it."""

    structural: ClassVar[bool] = True
    op: Literal["remove"] = "remove"
    tune: Optional[TuneSpec] = None


ACTIONS.add("remove", RemoveAction)


def present_sublayers(model: nn.Module) -> set[str]:
    return {sublayer.name for sublayer in get_adapter(model).all_sublayers()}


OP_UNITS.add("remove", (present_sublayers, "an attention or MLP sublayer still present"))


@OPS.register("remove")
def remove_sublayers_op(model: nn.Module, actions: list[Action], context: ApplyContext) -> None:
    """Remove in plan order; a removal with ``tune`` first refits its MLP's output projection on the
    calibration data, from the model as earlier removals left it (as the search did)."""
    if not any(action.tune for action in actions):
        remove_sublayers(model, [action.unit for action in actions])
        return

    calibration = context.require_calibration()
    settings = calibration.settings
    stream = SublayerStream(model, calibration.tokens(), settings.calib_batch_size, num_checkpoints=4)
    for action in actions:
        position = stream.position_of(action.unit)
        if action.tune is not None:
            tune = action.tune
            fit = tune_for_removal(stream, stream.states_at(position), position, tune.ratio, tune.damping,
                                   tune.direction, tune.damping_relative)
            if fit is None or fit["unit"] != action.tune.unit:
                raise PlanError(f"The plan tunes {action.tune.unit} for {action.unit}, but that is not the MLP "
                                "following it in this model.")
            fit["module"].weight.data.index_copy_(fit["dim"], fit["index"], fit["values"])
        remove_sublayers(model, [action.unit])
        stream.refresh(position)


STRUCTURE_REPLAY.add("remove", lambda model, actions: remove_sublayers(model, [a.unit for a in actions]))


def remove_sublayers(model: nn.Module, names: Iterable[str]) -> None:
    """Delete the named sublayers (``model.layers.7.self_attn``, ``model.layers.7.mlp``) in place."""
    adapter = get_adapter(model)
    for name in names:
        adapter.remove(adapter.sublayer(name))


@contextlib.contextmanager
def temporarily_removed(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Remove the named sublayers for the duration of the block, then put the very same modules back."""
    adapter = get_adapter(model)
    logs = [adapter.remove(adapter.sublayer(name)) for name in names]
    try:
        yield
    finally:
        for log in reversed(logs):
            log.undo()
