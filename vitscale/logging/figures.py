"""Every PNG vitscale draws (training's MAE pictures, ``analyze``, ``eval``, ``plot``) starts and ends here.

A ``Figure`` with its own Agg canvas, never pyplot: no global figure state shared between threads or left open
in a long training process, and no display needed. matplotlib is imported on first use only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

DPI = 90


def new_figure(width: float, height: float, dpi: int = DPI) -> Any:
    """A blank ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Union[str, Path], dpi: Optional[int] = None, tight: bool = False) -> Path:
    """Write ``fig`` as a PNG (parent folders created) at its own dpi unless given; ``tight`` crops the margins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi or fig.dpi, bbox_inches="tight" if tight else None)
    return path
