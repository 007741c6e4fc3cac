"""Position embeddings: fixed 2-D sin-cos tables and resizing a learned table to a new patch grid."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

GridSize = Union[int, tuple[int, int]]


def to_2tuple(x: GridSize) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def sincos_1d(dim: int, pos: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """(len(pos), dim) table: sin on the first half of the channels, cos on the second."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim / 2.0)
    omega = temperature ** -omega
    angles = pos.reshape(-1).to(torch.float32)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: GridSize, num_prefix_tokens: int = 0, temperature: float = 10000.0,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """Fixed 2-D sin-cos table of shape (num_prefix_tokens + gh*gw, dim), float32, row-major patch order.

    Half of the channels encode the column (x) coordinate, half the row (y), as in the MAE code; prefix
    (class) tokens get zeros.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    gh, gw = to_2tuple(grid_size)
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32, device=device),
                            torch.arange(gw, dtype=torch.float32, device=device), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, xs, temperature), sincos_1d(dim // 2, ys, temperature)], dim=1)
    if num_prefix_tokens:
        table = torch.cat([table.new_zeros(num_prefix_tokens, dim), table], dim=0)
    return table.float()


def resize_pos_embed(posemb: torch.Tensor, new_grid: GridSize, num_prefix_tokens: int = 1,
                     old_grid: Optional[GridSize] = None, interpolation: str = "bicubic",
                     antialias: bool = True) -> torch.Tensor:
    """Resize a (1, prefix + gh*gw, D) position table to ``new_grid``; prefix (class) rows are kept as-is.

    The patch part is interpolated over the 2-D grid (bicubic, antialiased when shrinking, as timm does).
    ``old_grid`` defaults to a square grid. Resizing to the same grid returns the same values.
    """
    if posemb.ndim != 3:
        raise ValueError(f"expected a (1, L, D) position table, got shape {tuple(posemb.shape)}")
    new_h, new_w = to_2tuple(new_grid)
    prefix, patches = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    n = patches.shape[1]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patch positions do not form a square grid: pass old_grid")
        old_grid = (side, side)
    old_h, old_w = to_2tuple(old_grid)
    if old_h * old_w != n:
        raise ValueError(f"old_grid {old_grid} does not match {n} patch positions")
    dtype = patches.dtype
    grid = patches.reshape(patches.shape[0], old_h, old_w, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_h, new_w), mode=interpolation, antialias=antialias,
                         align_corners=False if interpolation in ("bilinear", "bicubic") else None)
    patches = grid.permute(0, 2, 3, 1).reshape(patches.shape[0], new_h * new_w, -1).to(dtype)
    return torch.cat([prefix, patches], dim=1)
