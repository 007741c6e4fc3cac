"""Analytic forward FLOPs and parameter counts (no forward pass, no memory).

FLOPs count matmuls and convolutions as 2*M*N*K, like ``torch.utils.flop_counter.FlopCounterMode``;
norms, activations, softmax and elementwise ops are not counted. Training costs ~3x the forward.
The count reads only the model's configuration, so it also works on meta or ZeRO-3-sharded models.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import nn

from vitscale.models.pos_embed import to_2tuple


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def blocks_flops(tokens: int, dim: int, num_heads: int, mlp_hidden: int, depth: int) -> int:
    del num_heads  # attention FLOPs do not depend on the head split
    per_block = (linear_flops(tokens, dim, 3 * dim)      # qkv
                 + 2 * 2 * tokens * tokens * dim    # q @ k^T and attn @ v over all heads
                 + linear_flops(tokens, dim, dim)        # proj
                 + linear_flops(tokens, dim, mlp_hidden) + linear_flops(tokens, mlp_hidden, dim))  # mlp
    return depth * per_block


def _embed(vit: nn.Module, img_size: tuple[int, int]) -> int:
    pe = vit.patch_embed
    if hasattr(pe, "flops"):  # hybrid stem knows its own cost
        return int(pe.flops(img_size))
    ph, pw = pe.patch_size
    patches = (img_size[0] // ph) * (img_size[1] // pw)
    return linear_flops(patches, vit.in_chans * ph * pw, vit.embed_dim)


def num_patches(vit: nn.Module, img_size: tuple[int, int]) -> int:
    ph, pw = vit.patch_embed.patch_size
    return (img_size[0] // ph) * (img_size[1] // pw)


def vit_flops(vit: nn.Module, img_size: tuple[int, int], visible: Optional[int] = None,
              with_head: bool = True) -> int:
    """Encoder FLOPs per image; ``visible`` = patch tokens that enter the blocks (default: all)."""
    n = num_patches(vit, img_size) if visible is None else visible
    tokens = n + vit.num_prefix_tokens
    total = _embed(vit, img_size) + blocks_flops(tokens, vit.embed_dim, vit.num_heads, vit.mlp_hidden_dim, vit.depth)
    if with_head and vit.num_classes > 0:
        total += linear_flops(1, vit.embed_dim, vit.num_classes)
    return total


def forward_flops(model: nn.Module, img_size: Union[int, tuple[int, int], None] = None,
                  mask_ratio: Optional[float] = None) -> int:
    """Forward FLOPs for one image: the model's own ``forward_flops`` (every vitscale model has one; an MAE's
    ``mask_ratio`` defaults to its own, a plain ViT takes none). A wrapper (e.g. a DeepSpeed engine) is unwrapped."""
    if not hasattr(model, "forward_flops") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if not hasattr(model, "forward_flops"):
        raise TypeError(f"forward_flops supports vitscale's models, got {type(model).__name__}")
    size = to_2tuple(img_size) if img_size is not None else None
    return int(model.forward_flops(size, mask_ratio=mask_ratio))
