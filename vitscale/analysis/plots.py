"""Figures for ``vitscale analyze`` (headless figures from :mod:`vitscale.logging.figures`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import numpy as np

from vitscale.logging.figures import new_figure, save_figure


def _pixel_axes(ax, height: int, width: int) -> None:
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)


# ----- attention ---------------------------------------------------------------------------------------------
def plot_rollout(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], names: Sequence[str], path: Path,
                 title: str) -> Path:
    """One row per image: the input, and the [CLS] rollout map (fraction of [CLS]'s input per patch) over it."""
    n = len(images)
    fig = new_figure(7.2, 3.2 * n + 0.4)
    axes = fig.subplots(n, 2, squeeze=False)
    for i, (img, m, name) in enumerate(zip(images, maps, names)):
        h, w = img.shape[:2]
        ax = axes[i, 0]
        ax.imshow(img, extent=(0, w, h, 0))
        ax.set_title(f"{name}: input", fontsize=9)
        _pixel_axes(ax, h, w)
        ax = axes[i, 1]
        ax.imshow(img, extent=(0, w, h, 0))
        lo, hi = float(m.min()), float(m.max())
        im = ax.imshow(m, extent=(0, w, h, 0), cmap="inferno", alpha=0.65, interpolation="bilinear",
                       vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
        ax.set_title(f"{name}: attention rollout", fontsize=9)
        _pixel_axes(ax, h, w)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="rollout weight (sums to 1)")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, tight=True)


def plot_layer_attention(image: np.ndarray, maps: Sequence[np.ndarray], path: Path, title: str) -> Path:
    """Raw attention of [CLS] to the patches at every layer (one head), with a shared colour scale."""
    depth = len(maps)
    cols = min(depth + 1, 6)
    rows = math.ceil((depth + 1) / cols)
    fig = new_figure(2.1 * cols + 0.8, 2.2 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    h, w = image.shape[:2]
    vmax = max(float(np.max(m)) for m in maps) or 1.0
    axes[0, 0].imshow(image, extent=(0, w, h, 0))
    axes[0, 0].set_title("input", fontsize=8)
    im = None
    for i, m in enumerate(maps):
        ax = axes.flat[i + 1]
        im = ax.imshow(m, extent=(0, w, h, 0), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {i + 1}", fontsize=8)
    for k, ax in enumerate(axes.flat):
        if k > depth:
            ax.axis("off")
            continue
        ax.tick_params(labelsize=6)
        if k % cols == 0:
            ax.set_ylabel("y (px)", fontsize=7)
        if k // cols == rows - 1 or k + cols > depth:
            ax.set_xlabel("x (px)", fontsize=7)
    fig.colorbar(im, ax=list(axes.flat), fraction=0.025, pad=0.02, label="attention weight (softmax)")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, tight=True)


def plot_mean_distance(dist: np.ndarray, path: Path, title: str, uniform_px: Optional[float] = None) -> Path:
    """Mean attention distance (pixels) per head (dots) against depth (network layer)."""
    depth, heads = dist.shape
    fig = new_figure(5.6, 4.2)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab20"]
    layers = np.arange(1, depth + 1)
    for h in range(heads):
        jitter = (h - (heads - 1) / 2) * min(0.3 / max(heads, 1), 0.04)
        ax.scatter(layers + jitter, dist[:, h], s=18, color=cmap(h % 20), label=f"head {h}" if heads <= 16 else None,
                   edgecolors="none")
    if uniform_px is not None:
        ax.axhline(uniform_px, color="grey", ls="--", lw=1, label="uniform attention")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(layers if depth <= 24 else np.linspace(1, depth, 9).round().astype(int))
    top = max(float(dist.max()) if dist.size else 0.0, uniform_px or 0.0)
    ax.set_ylim(0, max(top * 1.1, 1e-6))
    ax.grid(alpha=0.3)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path, tight=True)


# ----- position embeddings -----------------------------------------------------------------------------------
def similarity_mosaic(sim: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, N) similarities -> one image of gh x gw tiles (tile (r, c) = position (r, c)'s row), NaN gaps."""
    gh, gw = grid
    mosaic = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan, dtype=np.float32)
    for r in range(gh):
        for c in range(gw):
            mosaic[r * (gh + 1):r * (gh + 1) + gh, c * (gw + 1):c * (gw + 1) + gw] = sim[r * gw + c].reshape(gh, gw)
    return mosaic


def plot_pos_embed_similarity(sim: np.ndarray, grid: tuple[int, int], path: Path, title: str) -> Path:
    """The paper's figure: for each position, a small map of its cosine similarity with every position."""
    gh, gw = grid
    mosaic = similarity_mosaic(sim, grid)
    side = min(max(4.5, 0.35 * max(gh, gw)), 10.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    # Colour range: [-1, 1] when the table uses it, else [floor(min), 1] so that structure stays visible.
    lo = float(np.nanmin(mosaic)) if np.isfinite(mosaic).any() else -1.0
    lo = -1.0 if lo < -0.5 else math.floor(lo * 10) / 10
    im = ax.imshow(mosaic, cmap=cmap, vmin=min(lo, 0.9), vmax=1.0, interpolation="nearest")

    def ticks(n: int) -> tuple[np.ndarray, list[str]]:
        idx = np.arange(n) if n <= 16 else np.unique(np.linspace(0, n - 1, 8).round().astype(int))
        return idx * (n + 1) + (n - 1) / 2, [str(i + 1) for i in idx]

    xt, xl = ticks(gw)
    yt, yl = ticks(gh)
    ax.set_xticks(xt, xl, fontsize=7)
    ax.set_yticks(yt, yl, fontsize=7)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path, tight=True)


# ----- patch-embedding filters -------------------------------------------------------------------------------
def _to_rgb_tile(comp: np.ndarray) -> np.ndarray:
    """(C, p, p) -> (p, p, 3) in [0, 1], min-max scaled per tile (a component's sign/scale is arbitrary)."""
    c = comp.astype(np.float64)
    c = (c - c.min()) / (c.max() - c.min()) if c.max() > c.min() else np.full_like(c, 0.5)
    if c.shape[0] == 1:
        c = np.repeat(c, 3, axis=0)
    return np.transpose(c[:3], (1, 2, 0))


def plot_filters(components: np.ndarray, ratio: np.ndarray, path: Path, title: str, cols: int = 7) -> Path:
    """Top principal components of the patch filters as RGB tiles, with the explained-variance curve."""
    k = len(components)
    rows = max(1, math.ceil(k / cols))
    fig = new_figure(1.05 * cols + 0.3, 1.15 * rows + 2.3)
    gs = fig.add_gridspec(rows + 2, cols, height_ratios=[1] * rows + [0.25, 1.9])
    for i in range(rows * cols):
        ax = fig.add_subplot(gs[i // cols, i % cols])
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.axis("off")
            continue
        ax.imshow(_to_rgb_tile(components[i]), interpolation="nearest")
        ax.set_title(f"PC{i + 1} {100 * ratio[i]:.1f}%", fontsize=6, pad=2)
    ax = fig.add_subplot(gs[rows + 1, :])
    ax.bar(np.arange(1, k + 1), 100 * ratio, color="tab:blue", label="per component")
    ax.plot(np.arange(1, k + 1), 100 * np.cumsum(ratio), color="tab:orange", marker=".", label="cumulative")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, tight=True)
