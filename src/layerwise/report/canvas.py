"""Figures drawn without pyplot: no global figure state to close and no GUI backend to choose."""

from __future__ import annotations

import io

from matplotlib.figure import Figure


def subplots(*grid: int, figsize: tuple[float, float], **options):
    """A figure and its axes, as ``pyplot.subplots`` returns them."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **options)


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
