"""Allocators: one file each, registered in ``ALLOCATORS``; all compared on the same budget."""

from . import alpha, drop_last, owl, shortgpt, sleb, sprint, uniform  # noqa: F401  (registers)
from .base import ALLOCATORS, Allocation, AllocationContext, exact_counts
from .depth import DEPTH_ALLOCATORS, DepthAllocation, DepthContext, DepthStep

__all__ = [
    "ALLOCATORS",
    "Allocation",
    "AllocationContext",
    "DEPTH_ALLOCATORS",
    "DepthAllocation",
    "DepthContext",
    "DepthStep",
    "exact_counts",
]
