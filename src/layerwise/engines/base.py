"""What an engine returns; the engines register themselves in ``ENGINES`` (declared with the settings that name
them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import ENGINES, RunSettings
from ..measure import Timings


@dataclass
class Evaluation:
    """What an engine measured of one model: where it came from, metrics, the perplexity protocol."""

    model: dict[str, Any]
    metrics: dict[str, Any]
    protocol: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Evaluator = Callable[[str, RunSettings, Timings], Evaluation]
__all__ = ["ENGINES", "Evaluation", "Evaluator"]
