"""Allocators: one file each, registered in ``ALLOCATORS``; all compared on the same budget."""

from . import alpha, owl, uniform  # noqa: F401  (registers)
from .base import ALLOCATORS, Allocation, AllocationContext, exact_counts

__all__ = ["ALLOCATORS", "Allocation", "AllocationContext", "exact_counts"]
