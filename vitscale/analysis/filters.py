"""Principal components of the patch-embedding filters (Dosovitskiy et al., Fig. 7 left), numbers only."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FilterPCA:
    components: torch.Tensor          # (k, C, p, p): unit-norm principal directions, first = most variance
    explained_variance: torch.Tensor  # (k,) variance of the filters along each component, descending
    explained_variance_ratio: torch.Tensor  # (k,) fraction of the total variance
    mean: torch.Tensor                # (C, p, p): the mean filter (removed before the PCA)


def patch_filter_pca(weight: torch.Tensor, k: int = 28) -> FilterPCA:
    """PCA of a patch projection's filters.

    ``weight``: (D, C, p, p) (the ``patch_embed.proj`` conv) or (D, C*p*p) (a linear layer over flattened
    patches). The D filters are the samples, each a point in C*p*p-dim pixel space; they are centred and
    decomposed by SVD. Returns at most ``min(k, D - 1, C*p*p)`` components (the rank of centred data).
    Components are orthonormal and ordered by explained variance; each has its sign fixed so that its
    largest-magnitude entry is positive (PCA signs are arbitrary).
    """
    w = weight.detach().to(torch.float64).cpu()
    if w.ndim == 4:
        shape = tuple(w.shape[1:])
    elif w.ndim == 2:
        shape = (w.shape[1],)
    else:
        raise ValueError(f"expected filters (D, C, p, p) or (D, C*p*p), got shape {tuple(w.shape)}")
    x = w.reshape(w.shape[0], -1)
    d, f = x.shape
    if d < 2:
        raise ValueError("PCA needs at least 2 filters")
    mean = x.mean(dim=0)
    xc = x - mean
    _, s, vt = torch.linalg.svd(xc, full_matrices=False)
    var = s ** 2 / (d - 1)
    total = var.sum()
    n = min(k, d - 1, f)
    comps = vt[:n]
    flip = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    comps = comps * torch.where(flip == 0, torch.ones_like(flip), flip)
    ratio = var[:n] / total if total > 0 else torch.zeros(n, dtype=var.dtype)
    return FilterPCA(components=comps.reshape(n, *shape).float(), explained_variance=var[:n].float(),
                     explained_variance_ratio=ratio.float(), mean=mean.reshape(shape).float())
