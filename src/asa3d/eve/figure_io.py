"""Saving Eve's figures: PNG at a stated resolution, written atomically."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from asa3d.atomic import atomic_write_with

__all__ = ["MIN_DPI", "new_figure", "save_png"]

MIN_DPI = 150  # print quality for papers and reports


def new_figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas (no pyplot state, safe in worker processes)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path, dpi: int = MIN_DPI) -> Path:
    if dpi < MIN_DPI:
        raise ValueError(f"dpi={dpi}: Eve's figures are written at >= {MIN_DPI} dpi")
    return atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
