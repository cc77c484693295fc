"""Engines that run a model for measurement under one protocol: ``pytorch`` (in memory, any model layerwise
loads) and ``llama.cpp`` (a GGUF file through llama-cpp-python). Each computes the same perplexity protocol
and the same latency setting, so a plan is measured where it will be deployed."""

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

from . import llamacpp_eval, pytorch  # noqa: E402,F401  (register the engines)

__all__ = ["ENGINES", "Evaluation", "Evaluator"]
