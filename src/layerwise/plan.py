"""Plan and Action: the pure-data hand-off from allocators to ops, as readable, diffable JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from .cache import atomic_write_text
from .config import Budget
from .errors import PlanError
from .registry import Registry

PLAN_FORMAT = "layerwise.plan/1"


class Action(BaseModel):
    """One step of a plan on one unit. Each op module defines its own kind (fields, checks), registers it in
    ``ACTIONS`` under its ``op`` and owns applying it, its valid units and its replay on load: a new kind of
    action is one file."""

    model_config = ConfigDict(extra="forbid")
    # changes modules or shapes: replayed on load before the saved weights are read
    structural: ClassVar[bool] = False
    unit: str
    op: str


ACTIONS: Registry[type[Action]] = Registry("plan operation")


class CalibrationRecord(BaseModel):
    """The calibration windows a plan was computed on, and the hash of their token ids: applying the plan
    draws the same windows (its Wanda norms, Hessians and refits need them) or refuses."""

    model_config = ConfigDict(extra="forbid")
    # RunSettings field -> the record's field holding its value
    SETTINGS: ClassVar[dict[str, str]] = {"corpus": "corpus", "calib_text": "calib_text", "nsamples": "nsamples",
                                          "calib_seqlen": "seqlen", "seed": "seed", "calib_batch_size": "batch_size"}
    corpus: str
    calib_text: Optional[str] = None
    nsamples: int = Field(ge=1)
    seqlen: int = Field(ge=2)
    seed: int
    batch_size: int = Field(ge=1, description="windows per forward pass (accumulation order of the statistics)")
    bos: Optional[str] = None
    tokens: str = Field(description="sha256 prefix of the calibration token ids")


class Plan(BaseModel):
    """Per-unit actions plus the budget, the allocator and its parameters, the cost prediction and the
    calibration it was computed on."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["layerwise.plan/1"] = PLAN_FORMAT
    model: str
    architecture: dict[str, Any]
    weights: Optional[str] = Field(None, description="fingerprint of the weights (and dtype) the plan was computed "
                                                     "on; apply refuses other weights unless told")
    budget: Budget
    allocator: str
    method: str
    allocator_params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    actions: list[SerializeAsAny[Action]]
    calibration: Optional[CalibrationRecord] = None
    prediction: dict[str, Any] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)

    @field_validator("actions", mode="before")
    @classmethod
    def _actions_of_their_kind(cls, actions: Any) -> Any:
        """Each action read as the kind its ``op`` registered (a plan names its kinds in the data)."""
        if not isinstance(actions, list):
            return actions
        typed = []
        for index, action in enumerate(actions):
            if isinstance(action, dict):
                op = action.get("op")
                if op not in ACTIONS:
                    raise ValidationError.from_exception_data("Action", [{
                        "type": "union_tag_invalid", "loc": (index,), "input": action,
                        "ctx": {"discriminator": "'op'", "tag": str(op),
                                "expected_tags": ", ".join(f"'{name}'" for name in ACTIONS.names())}}])
                try:
                    action = ACTIONS.get(op).model_validate(action)
                except ValidationError as exc:  # located as a tagged union locates them: actions.<index>.<op>.<field>
                    raise ValidationError.from_exception_data("Action", [
                        {key: error[key] for key in ("type", "input", "ctx") if key in error}
                        | {"loc": (index, op, *error["loc"])} for error in exc.errors()]) from None
            typed.append(action)
        return typed

    def structural_actions(self) -> list[Action]:
        """Actions that change shapes or modules: a saved model needs them replayed to load its weights."""
        return [action for action in self.actions if action.structural]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"

    def save(self, path: str | Path) -> Path:
        target = Path(path)
        atomic_write_text(target, self.to_json())
        return target

    @classmethod
    def from_json(cls, text: str, origin: str = "the plan") -> "Plan":
        """Parse a plan, turning any malformation into one ``PlanError`` sentence."""
        try:
            return cls.model_validate(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"{origin} is not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "top level"
            raise PlanError(f"{origin} is not a valid layerwise plan: {where}: {first['msg']}.") from exc

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        file = Path(path).expanduser()
        if not file.is_file():
            raise PlanError(f"Plan file {file} does not exist.")
        return cls.from_json(file.read_text(encoding="utf-8"), origin=f"Plan file {file}")

