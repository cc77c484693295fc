"""Quantization levels a bit allocator chooses among: layerwise's own integer grids (``--bits 3,4,8`` with a
group size and symmetry) or GGUF types (``--bits q4_k,q6_k,q8_0``: llama.cpp's grids and quantizers). Each
level set says, per linear, which levels exist (a GGUF type that does not fit a row length becomes llama.cpp's
fallback, so only distinct stored types are offered), what a level costs in stored bits per weight, how a
weight looks after rounding to it, and which plan action stores it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import BudgetError
from ..gguf import GGUF_TYPES, gguf_type, stored_type
from ..gguf.quantize import round_trip
from ..ops.quantize import QuantizeAction, rtn_round_trip

Level = Any  # int (own grid: bits) or str (GGUF type name)


class LevelSet(ABC):
    """The choices of one quantization run, and what each means for a given linear."""

    choices: list

    @abstractmethod
    def stored(self, linear: nn.Linear, level: Level) -> Level:
        """The level really stored when ``level`` is asked for this linear."""

    @abstractmethod
    def bits(self, linear: nn.Linear, level: Level) -> float:
        """Stored bits per weight of this linear at ``level`` (the budget's unit)."""

    @abstractmethod
    def round_trip(self, linear: nn.Linear, level: Level, importance: np.ndarray | None = None) -> torch.Tensor:
        """The linear's weight as computed with once stored at ``level``."""

    @abstractmethod
    def lossless(self, level: Level) -> bool:
        """True for levels whose rounding error is taken as nil (not measured by sensitivities)."""

    @abstractmethod
    def action(self, unit: str, level: Level, method: str, options: dict[str, Any]) -> QuantizeAction:
        """The plan action storing ``unit`` at ``level``."""

    def parse(self, text: str) -> Level:
        """A level as read back from JSON (cache files, plans)."""
        return text

    def levels(self, linear: nn.Linear) -> list[Level]:
        """Distinct stored levels for this linear, narrowest first."""
        stored = {self.stored(linear, level) for level in self.choices}
        return sorted(stored, key=lambda level: self.bits(linear, level))

    def describe(self) -> dict[str, Any]:
        return {"choices": [str(c) for c in self.choices]}


class GridLevels(LevelSet):
    """layerwise's own grids: ``bits`` per weight in groups of ``group_size`` inputs (nominal bits: scales and
    zero points are not counted, as AutoMP-RL and the quantization literature count them)."""

    def __init__(self, choices: Sequence[int], group_size: int | None, symmetric: bool) -> None:
        self.choices = sorted(int(c) for c in choices)
        self.group_size, self.symmetric = group_size, symmetric

    def stored(self, linear: nn.Linear, level: Level) -> Level:
        return int(level)

    def bits(self, linear: nn.Linear, level: Level) -> float:
        return float(level)

    def round_trip(self, linear: nn.Linear, level: Level, importance: np.ndarray | None = None) -> torch.Tensor:

        weight = linear.weight.data
        return rtn_round_trip(weight, int(level), self.group_size, self.symmetric).to(weight.dtype)

    def lossless(self, level: Level) -> bool:
        return int(level) >= 8

    def parse(self, text: str) -> Level:
        return int(text)

    def action(self, unit: str, level: Level, method: str, options: dict[str, Any]) -> QuantizeAction:
        return QuantizeAction(unit=unit, bits=int(level), group_size=self.group_size, symmetric=self.symmetric,
                              method=method, awq=bool(options.get("awq", False)),
                              act_order=bool(options.get("act_order", False)))

    def describe(self) -> dict[str, Any]:
        return {"choices": self.choices, "group_size": self.group_size, "symmetric": self.symmetric}


class GGUFLevels(LevelSet):
    """GGUF types, stored and rounded exactly as llama.cpp stores them (bits per weight include the block
    scales); ``imatrix`` weights the quantizer by the calibration's mean squared inputs."""

    def __init__(self, choices: Sequence[str], imatrix: bool = False) -> None:

        kinds = [gguf_type(c) for c in choices]
        if any(k.name == "f32" for k in kinds):
            raise BudgetError("f32 is not a quantization level; the widest GGUF level is f16.")
        self.choices = sorted({k.name for k in kinds}, key=lambda name: gguf_type(name).bits_per_weight)
        self.imatrix = imatrix

    def stored(self, linear: nn.Linear, level: Level) -> Level:

        return stored_type(level, linear.in_features).name

    def bits(self, linear: nn.Linear, level: Level) -> float:

        return stored_type(level, linear.in_features).bits_per_weight

    def round_trip(self, linear: nn.Linear, level: Level, importance: np.ndarray | None = None) -> torch.Tensor:

        return round_trip(linear.weight.data, stored_type(level, linear.in_features),
                          importance if self.imatrix else None)

    def lossless(self, level: Level) -> bool:
        return level in ("f16", "bf16")

    def action(self, unit: str, level: Level, method: str, options: dict[str, Any]) -> QuantizeAction:
        return QuantizeAction(unit=unit, bits=nominal_bits(level), group_size=None, method="gguf", format=level,
                              imatrix=self.imatrix)

    def describe(self) -> dict[str, Any]:
        return {"choices": self.choices, "gguf": True, "imatrix": self.imatrix}


def nominal_bits(kind: str) -> int:
    """The bit width a GGUF type is named after: q4_k -> 4, q8_0 -> 8, f16/bf16 -> 16."""
    return 16 if kind in ("f16", "bf16") else int(kind[1])


def parse_levels(text: str | int | Sequence, group_size: int | None = 128, symmetric: bool = False,
                 imatrix: bool = False) -> LevelSet:
    """``4``, ``3,4,8`` (own grid, 2-8 bits) or ``q4_k,q6_k,q8_0`` (GGUF types) as a level set."""

    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    parts = [str(p).strip().lower() for p in items if str(p).strip()]
    if parts and all(p in GGUF_TYPES for p in parts):
        return GGUFLevels(parts, imatrix)
    try:
        choices = sorted({int(p) for p in parts})
    except ValueError:
        raise BudgetError(f"--bits must be integers between 2 and 8 or GGUF types ({', '.join(GGUF_TYPES)}), "
                          f"not a mix (got '{text}').") from None
    if not choices or not all(2 <= b <= 8 for b in choices):
        raise BudgetError(f"--bits must lie between 2 and 8 (got '{text}').")
    if imatrix:
        raise BudgetError("--imatrix applies to GGUF types (e.g. --bits q4_k,q6_k), not to layerwise's own grid.")
    return GridLevels(choices, group_size, symmetric)
