"""Plan and Action: the pure-data hand-off from allocators to ops, as readable, diffable JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .cache import atomic_write_text
from .config import Budget
from .errors import PlanError

PLAN_FORMAT = "layerwise.plan/1"


class SparsifyAction(BaseModel):
    """Zero ``ratio`` of one linear's weights, chosen by ``method`` (magnitude, ...)."""

    model_config = ConfigDict(extra="forbid")
    unit: str
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


class RemoveAction(BaseModel):
    """Delete one attention or MLP sublayer (``model.layers.7.self_attn``); the residual path stays.
    Removals apply in plan order, so a ``tune`` step sees the model as the search saw it."""

    model_config = ConfigDict(extra="forbid")
    unit: str
    op: Literal["remove"] = "remove"
    tune: Optional[TuneSpec] = None


class SliceAction(BaseModel):
    """Keep ``keep`` width units of one sublayer: query heads of an attention sublayer (whole KV groups, so a
    multiple of the group size), or channels of an MLP. ``kept`` lists which (KV-group indices, or channel
    indices), as the planner's ``method`` (taylor or act) ranked them; plans without it rank again on the
    calibration data when applied. The rest are sliced away for real."""

    model_config = ConfigDict(extra="forbid")
    unit: str
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


class QuantizeAction(BaseModel):
    """Store one linear's weight at ``bits`` bits, per output channel (``group_size`` None) or in groups of
    ``group_size`` inputs (a shorter last group when it does not divide the input width); or, with
    ``format``, as that GGUF type (method ``gguf``: llama.cpp's own grid and quantizer, ``bits`` nominal)."""

    model_config = ConfigDict(extra="forbid")
    unit: str
    op: Literal["quantize"] = "quantize"
    bits: int = Field(ge=2, le=16, description="2-8 on layerwise's own grid; a GGUF type's nominal width")
    group_size: Optional[int] = Field(128, ge=1)
    symmetric: bool = False
    method: str = "rtn"
    awq: bool = Field(False, description="AWQ first: fold activation-aware input scales in and clip weights, "
                                          "both searched on calibration outputs")
    act_order: bool = Field(False, description="gptq: columns in order of decreasing Hessian diagonal, static groups")
    format: Optional[str] = Field(None, description="GGUF type (q4_k, q8_0, ...); needs method gguf")
    imatrix: bool = Field(False, description="gguf: weight the quantizer by the calibration's mean squared inputs")

    @model_validator(mode="after")
    def _format_needs_gguf_method(self) -> "QuantizeAction":
        if (self.format is None) != (self.method != "gguf"):
            raise ValueError("a GGUF format goes with method 'gguf', and method 'gguf' needs a format")
        if self.format is None and self.bits > 8:
            raise ValueError(f"layerwise's own grid stores 2 to 8 bits, not {self.bits}")
        if self.format is not None:
            from .gguf import GGUF_TYPES

            if self.format not in GGUF_TYPES:
                raise ValueError(f"unknown GGUF type '{self.format}' (known: {', '.join(GGUF_TYPES)})")
        return self


Action = Annotated[Union[SparsifyAction, RemoveAction, SliceAction, QuantizeAction], Field(discriminator="op")]
STRUCTURAL_OPS = ("remove", "slice", "quantize")  # ops that change modules, replayed before saved weights load


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
    actions: list[Action]
    calibration: Optional[CalibrationRecord] = None
    prediction: dict[str, Any] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)

    def structural_actions(self) -> list[Action]:
        """Actions that change shapes or modules: a saved model needs them replayed to load its weights."""
        return [action for action in self.actions if action.op in STRUCTURAL_OPS]

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

