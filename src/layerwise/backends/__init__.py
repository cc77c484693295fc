"""Backends apply plans for real; one file per family of operations."""

from . import sparsegpt, unstructured  # noqa: F401  (registers op 'sparsify' and its methods)
from .base import OPS, ApplyContext, apply_plan, architecture_signature, check_plan_fits
from .unstructured import SPARSIFIERS

__all__ = ["OPS", "SPARSIFIERS", "ApplyContext", "apply_plan", "architecture_signature", "check_plan_fits"]
