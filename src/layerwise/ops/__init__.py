"""Backends apply plans for real; one file per family of operations."""

from . import depth, gguf_quant, quantize, sparsegpt, structured, unstructured  # noqa: F401  (registers ops and methods)
from .base import OPS, ApplyContext, apply_plan, architecture_signature, check_plan_fits
from .depth import remove_sublayers, temporarily_removed
from .unstructured import SPARSIFIERS

__all__ = [
    "OPS",
    "SPARSIFIERS",
    "ApplyContext",
    "apply_plan",
    "architecture_signature",
    "check_plan_fits",
    "remove_sublayers",
    "temporarily_removed",
]
