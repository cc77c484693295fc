"""Pydantic settings shared by the API, the CLI and the benchmarks: budgets and the run protocol."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from .errors import BudgetError


class Budget(BaseModel):
    """What the plan must reach: mean sparsity over all decoder linears, weighted by parameter count."""

    model_config = ConfigDict(extra="forbid")
    sparsity: float = Field(ge=0.0, lt=1.0)

    @classmethod
    def for_sparsity(cls, sparsity: float) -> "Budget":
        """A sparsity budget, or ``BudgetError`` when it lies outside [0, 1)."""
        if not 0.0 <= sparsity < 1.0:
            raise BudgetError(f"Sparsity must lie in [0, 1) (got {sparsity}).")
        return cls(sparsity=sparsity)


class RunSettings(BaseModel):
    """The evaluation protocol and calibration sampling of a run (stored beside every number)."""

    model_config = ConfigDict(extra="forbid")
    corpus: str = "wiki"
    eval_text: Optional[str] = None
    calib_text: Optional[str] = None
    seqlen: int = Field(512, ge=2)
    max_windows: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    dtype: str = "float32"
    device: str = "cpu"
    nsamples: int = Field(128, ge=1)
    calib_seqlen: Optional[int] = Field(None, ge=2, description="calibration window; None = seqlen")
    calib_batch_size: int = Field(8, ge=1)
    seed: int = 0
