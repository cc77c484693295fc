"""Reports: plots of a run's allocation (HTML comparison pages join here)."""

from .allocation import block_sparsity, plot_allocation, read_result

__all__ = ["block_sparsity", "plot_allocation", "read_result"]
