"""Structures: one module each, registered in ``STRUCTURES`` (see ``base.Structure``)."""

from . import depth, joint, quant, unstructured, width  # noqa: F401
from .base import STRUCTURES, PlanRequest, Structure, check_params, register

__all__ = ["STRUCTURES", "PlanRequest", "Structure", "check_params", "register"]
