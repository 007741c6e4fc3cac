"""Interpretability: attention rollout, mean attention distance, position-embedding similarity, patch-filter
PCA and MAE reconstructions. Numbers in attention/pos_embed/filters, figures in plots, orchestration in run.

The public names load on first use (PEP 562): ``vitscale analyze``'s argument parser lives in this package, and every
``vitscale`` call registers it, so importing the package must not import torch (1.2 s on the 2-core test machine).
"""
import importlib

_HOMES = {"attention_rollout": "attention", "mean_attention_distance": "attention",
          "patch_distance_matrix": "attention", "rollout_to_patches": "attention", "patch_filter_pca": "filters",
          "pos_embed_similarity": "pos_embed", "analyze": "run"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
