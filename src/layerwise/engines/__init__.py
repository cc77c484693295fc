"""Engines that run a model for measurement under one protocol: ``pytorch`` (in memory, any model layerwise
loads) and ``llama.cpp`` (a GGUF file through llama-cpp-python). Each computes the same perplexity protocol
and the same latency setting, so a plan is measured where it will be deployed."""

from . import llamacpp_eval, pytorch  # noqa: F401  (register the engines)
from .base import ENGINES, Evaluation, Evaluator

__all__ = ["ENGINES", "Evaluation", "Evaluator"]
