"""result.json as a versioned pydantic model: what every run writes, checked when it is written and read.

Version 2 adds the ``format`` field; files written before it (version 1) have the same shape and still open.
The per-structure metrics (removed sublayers, widths, bits, curves) stay open-ended beside the typed core.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .cache import atomic_write_json
from .errors import DataError
from .plan import Plan

RESULT_FORMAT = "layerwise.result/2"
LEGACY_FORMAT = "layerwise.result/1"  # files without a format field


class Metrics(BaseModel):
    """The measured numbers every run has (a structure's own ones ride along as extra fields)."""

    model_config = ConfigDict(extra="allow")
    ppl: Optional[float] = None
    dense_ppl: Optional[float] = None
    parameters: int
    weight_bytes: int
    nonzero_parameters: Optional[int] = None
    sparsity: Optional[float] = None
    latency: Optional[dict[str, Any]] = None
    zeroshot: Optional[dict[str, Any]] = None
    speedup: Optional[dict[str, Optional[float]]] = None


class Result(BaseModel):
    """One run of `compress`, `apply` or `eval`: what was run, on what, with which settings, and what it measured."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["layerwise.result/2", "layerwise.result/1"] = RESULT_FORMAT
    layerwise_version: str
    command: Literal["compress", "apply", "eval", "heal"]
    model: dict[str, Any]
    method: Optional[str] = None
    allocator: Optional[str] = None
    budget: Optional[dict[str, Union[int, float]]] = None  # a count stays an int
    metrics: Metrics
    protocol: Optional[dict[str, Any]] = None
    calibration: Optional[dict[str, Any]] = None
    plan: Optional[dict[str, Any]] = None
    deployment: Optional[dict[str, Any]] = None
    saved_plan: Optional[bool] = None
    timings: dict[str, Union[int, float]] = {}
    seed: int = 0
    settings: dict[str, Any] = {}
    versions: dict[str, str] = {}
    machine: dict[str, Any] = {}

    @field_validator("plan")
    @classmethod
    def _plan_is_a_plan(cls, plan: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """The plan as written (unset fields left out), checked against the Plan model."""
        if plan is not None:

            Plan.model_validate(plan)
        return plan

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Result":
        """A result from a record the pipeline built; a field of the wrong shape is a bug, so it raises."""
        return cls.model_validate({"format": RESULT_FORMAT, **record})

    def to_record(self) -> dict[str, Any]:
        """The JSON-ready dictionary, with exactly the sections the run wrote."""
        return self.model_dump(mode="json", exclude_unset=True)

    def save(self, path: str | Path) -> None:
        atomic_write_json(Path(path), self.to_record())

    @classmethod
    def load(cls, path: str | Path) -> "Result":
        """Read a result.json of any version, or raise ``DataError`` in one sentence."""
        file = Path(path)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{file} is not a readable result.json ({type(exc).__name__}).") from None
        if not isinstance(data, dict):
            raise DataError(f"{file} is not a result.json: it holds no JSON object.")
        data.setdefault("format", LEGACY_FORMAT)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "top level"
            raise DataError(f"{file} is not a valid layerwise result: {where}: {error['msg']}.") from None
