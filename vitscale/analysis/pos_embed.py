"""Position-embedding similarity (Dosovitskiy et al., Fig. 7 centre), numbers only."""
from __future__ import annotations

from typing import Union

import torch

from vitscale.models.pos_embed import to_2tuple


def pos_embed_similarity(pos_embed: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Cosine similarity of every patch position's embedding with every other one: (N, N), float32.

    ``pos_embed``: the model's table, (1, prefix + N, D) or (prefix + N, D); prefix rows ([CLS]) are dropped.
    Row i reshaped to the patch grid is the small map drawn for position i. The diagonal is 1 (a position
    with an all-zero embedding has similarity 0 with everything, including itself).
    """
    table = pos_embed.detach()
    if table.ndim == 3:
        if table.shape[0] != 1:
            raise ValueError(f"expected one position table (1, L, D), got shape {tuple(table.shape)}")
        table = table[0]
    if table.ndim != 2:
        raise ValueError(f"expected a position table (L, D), got shape {tuple(table.shape)}")
    x = table[num_prefix_tokens:].to(torch.float64)
    norms = x.norm(dim=1, keepdim=True)
    x = x / norms.clamp(min=1e-12)
    sim = (x @ x.T).clamp(-1.0, 1.0)
    return sim.float()


def similarity_stats(sim: torch.Tensor, grid_size: Union[int, tuple[int, int]]) -> dict:
    """Summary numbers of a similarity matrix: diagonal, off-diagonal mean, mean similarity of the 4 grid
    neighbours, and the correlation of similarity with grid distance (negative = nearby positions are alike)."""
    gh, gw = to_2tuple(grid_size)
    n = sim.shape[0]
    if n != gh * gw:
        raise ValueError(f"{n} positions do not match grid {(gh, gw)}")
    s = sim.double()
    diag = torch.diagonal(s)
    off = ~torch.eye(n, dtype=torch.bool)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).double()
    dist = torch.cdist(pos, pos)
    neighbours = (dist == 1.0)
    d, v = dist[off], s[off]
    corr = float("nan")
    if n > 2 and d.std() > 0 and v.std() > 0:
        corr = float(((d - d.mean()) * (v - v.mean())).mean() / (d.std(unbiased=False) * v.std(unbiased=False)))
    return {
        "diagonal_min": float(diag.min()), "diagonal_max": float(diag.max()),
        "offdiag_mean": float(v.mean()) if n > 1 else float("nan"),
        "offdiag_max": float(v.max()) if n > 1 else float("nan"),
        "neighbour_mean": float(s[neighbours].mean()) if neighbours.any() else float("nan"),
        "corr_with_distance": corr,
    }
