"""Attention analysis, numbers only (no plotting): attention rollout and mean attention distance.

Attention maps are softmax probabilities ``(B, heads, N, N)`` (rows = queries, each row sums to 1), one per
block, with the ``num_prefix_tokens`` prefix tokens first ([CLS] at index 0 when the model has one, then any
register tokens) and the patch tokens in row-major order, as returned by ``VisionTransformer.get_attention_maps``.
Every measure here is about the patches: register tokens, like [CLS], are never a target of a map or a distance.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from vitscale.models.pos_embed import to_2tuple

GridSize = Union[int, tuple[int, int]]


# ----- attention rollout (Abnar & Zuidema, 2020) --------------------------------------------------------------
def _fuse_heads(attn: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if attn.ndim != 4:
        raise ValueError(f"expected an attention map (B, heads, N, N), got shape {tuple(attn.shape)}")
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def rollout_step(rollout: Optional[torch.Tensor], attn: torch.Tensor, num_prefix_tokens: int = 1,
                 discard_ratio: float = 0.0, head_fusion: str = "mean") -> torch.Tensor:
    """One layer of rollout: ``A' = norm(0.5 * fuse(attn) + 0.5 * I)``, then ``A' @ rollout`` (B, N, N).

    ``discard_ratio`` zeroes that fraction of the smallest fused weights per query row (never the weights to
    the prefix tokens) before adding the identity, as in common rollout implementations; 0 keeps all.
    Lets a caller stream over layers without keeping every map (large models).
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    a = _fuse_heads(attn.float(), head_fusion)
    B, N, _ = a.shape
    if discard_ratio > 0:
        patches = a[..., num_prefix_tokens:]
        k = int(patches.shape[-1] * discard_ratio)
        if k > 0:
            idx = patches.topk(k, dim=-1, largest=False).indices
            a = a.clone()
            a[..., num_prefix_tokens:] = patches.scatter(-1, idx, 0.0)
    eye = torch.eye(N, dtype=a.dtype, device=a.device)
    a = 0.5 * a + 0.5 * eye  # the residual connection carries half of the signal
    a = a / a.sum(dim=-1, keepdim=True)
    return a if rollout is None else a @ rollout


def attention_rollout(attn_maps: Sequence[torch.Tensor], num_prefix_tokens: int = 1, discard_ratio: float = 0.0,
                      head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout over all layers: ``R = A'_L @ ... @ A'_1`` with ``A'_l = norm(0.5 A_l + 0.5 I)``.

    ``attn_maps``: one (B, heads, N, N) map per block, first block first. Returns R (B, N, N): row i is how
    much of token i's final representation flows from each input token. Use ``rollout_to_patches`` for the
    [CLS] -> patch map.
    """
    if len(attn_maps) == 0:
        raise ValueError("attention_rollout needs at least one attention map")
    rollout = None
    for attn in attn_maps:
        rollout = rollout_step(rollout, attn, num_prefix_tokens, discard_ratio, head_fusion)
    return rollout


def _query_row(a: torch.Tensor, num_prefix_tokens: int, has_cls: bool) -> torch.Tensor:
    """(B, N, N) -> (B, patches): the [CLS] row over the patch columns or the mean of the patch rows (register rows
    and columns left out). No guessing from ``num_prefix_tokens``: a model with registers and no [CLS] has prefix
    tokens too, and row 0 is then a register's."""
    p = num_prefix_tokens
    if has_cls:
        if p < 1:
            raise ValueError("has_cls=True needs a prefix token: [CLS] is token 0, and this map has no prefix tokens")
        return a[:, 0, p:]
    return a[:, p:, p:].mean(dim=1)


def rollout_to_patches(rollout: torch.Tensor, num_prefix_tokens: int, grid_size: GridSize, *,
                       has_cls: bool) -> torch.Tensor:
    """The query row of a rollout restricted to the patches, renormalised to sum 1, as (B, gh, gw).

    ``has_cls`` (required: the caller knows the model): True = the [CLS] row, for a model whose classifier reads
    [CLS] (a [CLS] token and ``global_pool='token'``); False = the mean of the patch rows, for a model that pools
    the patches (``global_pool='avg'``, with or without a [CLS] token, whose output is then unused). Register tokens
    (prefix tokens after [CLS]) are left out like [CLS] itself. If no mass reaches the patches (e.g. identity
    attention: [CLS] only ever attends to itself), every patch is equally (un)important and the map is uniform.
    """
    gh, gw = to_2tuple(grid_size)
    row = _query_row(rollout, num_prefix_tokens, has_cls)
    if row.shape[-1] != gh * gw:
        raise ValueError(f"{row.shape[-1]} patch tokens do not match grid {(gh, gw)}")
    total = row.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(row, 1.0 / row.shape[-1])
    row = torch.where(total > 1e-12, row / total.clamp(min=1e-30), uniform)
    return row.reshape(-1, gh, gw)


def query_attention_to_patches(attn: torch.Tensor, num_prefix_tokens: int, grid_size: GridSize,
                               head: Optional[int] = None, *, has_cls: bool) -> torch.Tensor:
    """Raw attention of [CLS] (``has_cls=True``) or of the mean patch query (False; see ``rollout_to_patches``) to
    every patch: (B, gh, gw) for one ``head`` (None = mean over heads). Not renormalised: the values are the softmax
    weights, so the map sums to less than 1 when the query also attends to prefix tokens (registers)."""
    gh, gw = to_2tuple(grid_size)
    a = attn.float().mean(dim=1) if head is None else attn[:, head].float()
    row = _query_row(a, num_prefix_tokens, has_cls)
    return row.reshape(-1, gh, gw)


# ----- mean attention distance (Dosovitskiy et al., Fig. 7 right) ---------------------------------------------
def patch_distance_matrix(grid_size: GridSize, patch_size: Union[int, tuple[int, int]] = 1,
                          device: Optional[torch.device] = None) -> torch.Tensor:
    """(N, N) Euclidean distances in pixels between patch centres of a row-major ``grid_size`` grid."""
    gh, gw = to_2tuple(grid_size)
    ph, pw = to_2tuple(patch_size)
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64, device=device) * ph,
                            torch.arange(gw, dtype=torch.float64, device=device) * pw, indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)
    return torch.cdist(pos, pos)


def mean_attention_distance_layer(attn: torch.Tensor, distances: torch.Tensor, num_prefix_tokens: int = 1
                                  ) -> torch.Tensor:
    """Mean attention distance of one layer per head, (B, heads), in the units of ``distances``.

    Patch-to-patch attention only: prefix-token rows and columns are dropped and each query's weights over
    the patches are renormalised to sum 1, so the value is the expected pixel distance from a query patch
    to the patches it attends to, averaged over query patches.
    """
    p = num_prefix_tokens
    a = attn[:, :, p:, p:].to(torch.float64)
    if a.shape[-1] != distances.shape[0]:
        raise ValueError(f"{a.shape[-1]} patch tokens but a distance matrix for {distances.shape[0]} patches")
    a = a / a.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    per_query = (a * distances.to(a.device)).sum(dim=-1)  # (B, heads, Nq)
    return per_query.mean(dim=-1)


def mean_attention_distance(attn_maps: Sequence[torch.Tensor], grid_size: GridSize,
                            patch_size: Union[int, tuple[int, int]], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Mean attention distance in pixels per layer and head, averaged over the batch: (depth, heads).

    ``patch_size`` is the pixel stride between neighbouring tokens (for a hybrid model, the ResNet stem's
    total stride). Uniform attention gives the mean pairwise distance of the grid; attention to self only
    gives 0.
    """
    distances = patch_distance_matrix(grid_size, patch_size)
    rows = [mean_attention_distance_layer(a, distances, num_prefix_tokens).mean(dim=0) for a in attn_maps]
    return torch.stack(rows).float()
