"""Allocators: one file each, registered in ``ALLOCATORS``; all compared on the same budget."""

from . import adapt, alpha, automp, bits, drop_last, owl, rl_allocator, rl_refine, shortgpt, sleb, sprint, uniform  # noqa: F401
from .base import ALLOCATORS, Allocation, AllocationContext, exact_counts
from .depth import DEPTH_ALLOCATORS, DepthAllocation, DepthContext, DepthStep
from .width import WIDTH_ALLOCATORS, WidthAllocation, WidthContext, Widths, WidthSpace, fit_budget

__all__ = [
    "ALLOCATORS",
    "Allocation",
    "AllocationContext",
    "DEPTH_ALLOCATORS",
    "DepthAllocation",
    "DepthContext",
    "DepthStep",
    "exact_counts",
    "fit_budget",
    "WIDTH_ALLOCATORS",
    "WidthAllocation",
    "WidthContext",
    "WidthSpace",
    "Widths",
]
