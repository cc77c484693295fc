"""The engine registry and what an engine returns; the engines register themselves in ``ENGINES``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import RunSettings
from ..measure import Timings
from ..registry import Registry


@dataclass
class Evaluation:
    """What an engine measured of one model: where it came from, metrics, the perplexity protocol."""

    model: dict[str, Any]
    metrics: dict[str, Any]
    protocol: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Evaluator = Callable[[str, RunSettings, Timings], Evaluation]
ENGINES: Registry[Evaluator] = Registry("engine")
