"""Interpretability: attention rollout, mean attention distance, position-embedding similarity, patch-filter
PCA and MAE reconstructions. Numbers in attention/pos_embed/filters, figures in plots, orchestration in run."""
from vitscale.analysis.attention import (attention_rollout, mean_attention_distance, patch_distance_matrix,
    rollout_to_patches)
from vitscale.analysis.filters import patch_filter_pca
from vitscale.analysis.pos_embed import pos_embed_similarity

__all__ = ["attention_rollout", "mean_attention_distance", "patch_distance_matrix", "rollout_to_patches",
           "patch_filter_pca", "pos_embed_similarity", "analyze"]


def __getattr__(name):  # matplotlib and the models only when used: `import vitscale.analysis` stays torch-light
    if name == "analyze":
        from vitscale.analysis.run import analyze
        return analyze
    raise AttributeError(name)
