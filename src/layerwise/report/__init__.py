"""Reports: a run's allocation plot, and the comparison page (HTML or markdown) across runs."""

from .allocation import block_sparsity, plot_allocation, read_result
from .figures import ALLOCATION_VIEWS, LayerMap, pareto_front
from .page import FORMATS, render_html, render_markdown, write_report
from .tables import RunSummary, comparison_table, markdown_table, summarize

__all__ = [
    "ALLOCATION_VIEWS",
    "FORMATS",
    "LayerMap",
    "RunSummary",
    "block_sparsity",
    "comparison_table",
    "markdown_table",
    "pareto_front",
    "plot_allocation",
    "read_result",
    "render_html",
    "render_markdown",
    "summarize",
    "write_report",
]
