"""``vitscale sweep``: a grid of trainings (and evaluations), resumable, summarised as mean +- std over seeds."""
from vitscale.sweep.grid import Cell, expand_grid, parse_axes

__all__ = ["Cell", "expand_grid", "parse_axes"]
