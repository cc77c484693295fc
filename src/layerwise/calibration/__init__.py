"""Calibration profile: block-by-block activation capture, input statistics, Hessians, spectra."""

from .blockwise import BlockwiseRunner, block_linears
from .hessian import HessianAccumulator, attach_hessians
from .profile import Profile, compute_profile, load_or_compute_profile
from .source import CalibrationSource
from .stats import InputStats, attach_input_stats

__all__ = [
    "BlockwiseRunner",
    "CalibrationSource",
    "HessianAccumulator",
    "InputStats",
    "Profile",
    "attach_hessians",
    "attach_input_stats",
    "block_linears",
    "compute_profile",
    "load_or_compute_profile",
]
