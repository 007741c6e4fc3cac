"""Analytic forward FLOPs and parameter counts (no forward pass, no memory).

FLOPs count matmuls and convolutions as 2*M*N*K, like ``torch.utils.flop_counter.FlopCounterMode``;
norms, activations, softmax and elementwise ops are not counted. Training costs ~3x the forward.
The count reads only the model's configuration, so it also works on meta or ZeRO-3-sharded models.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from vitscale.models.mae import MaskedAutoencoderViT
from vitscale.models.pos_embed import to_2tuple
from vitscale.models.registry import create_model
from vitscale.models.vit import VisionTransformer


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _blocks(tokens: int, dim: int, num_heads: int, mlp_hidden: int, depth: int) -> int:
    del num_heads  # attention FLOPs do not depend on the head split
    per_block = (_linear(tokens, dim, 3 * dim)      # qkv
                 + 2 * 2 * tokens * tokens * dim    # q @ k^T and attn @ v over all heads
                 + _linear(tokens, dim, dim)        # proj
                 + _linear(tokens, dim, mlp_hidden) + _linear(tokens, mlp_hidden, dim))  # mlp
    return depth * per_block


def _embed(vit: VisionTransformer, img_size: tuple[int, int]) -> int:
    pe = vit.patch_embed
    if hasattr(pe, "flops"):  # hybrid stem knows its own cost
        return int(pe.flops(img_size))
    ph, pw = pe.patch_size
    patches = (img_size[0] // ph) * (img_size[1] // pw)
    return _linear(patches, vit.in_chans * ph * pw, vit.embed_dim)


def _num_patches(vit: VisionTransformer, img_size: tuple[int, int]) -> int:
    ph, pw = vit.patch_embed.patch_size
    return (img_size[0] // ph) * (img_size[1] // pw)


def vit_flops(vit: VisionTransformer, img_size: tuple[int, int], visible: Optional[int] = None,
              with_head: bool = True) -> int:
    """Encoder FLOPs per image; ``visible`` = patch tokens that enter the blocks (default: all)."""
    n = _num_patches(vit, img_size) if visible is None else visible
    tokens = n + vit.num_prefix_tokens
    total = _embed(vit, img_size) + _blocks(tokens, vit.embed_dim, vit.num_heads, vit.mlp_hidden_dim, vit.depth)
    if with_head and vit.num_classes > 0:
        total += _linear(1, vit.embed_dim, vit.num_classes)
    return total


def forward_flops(model: nn.Module, img_size: Union[int, tuple[int, int], None] = None,
                  mask_ratio: Optional[float] = None) -> int:
    """Forward FLOPs for one image. MAE: encoder on the visible tokens (+[CLS]), decoder on all tokens;
    ``mask_ratio`` defaults to the model's. A plain ViT takes no ``mask_ratio``."""
    if not isinstance(model, (VisionTransformer, MaskedAutoencoderViT)) and isinstance(getattr(model, "module", None),
                                                                                     nn.Module):
        model = model.module  # a wrapper (e.g. a DeepSpeed engine)
    if isinstance(model, MaskedAutoencoderViT):
        enc = model.encoder
        size = to_2tuple(img_size) if img_size is not None else enc.patch_embed.img_size
        n = _num_patches(enc, size)
        ratio = model.mask_ratio if mask_ratio is None else mask_ratio
        keep = int(n * (1 - ratio))
        npt = model.num_prefix_tokens
        dd = model.decoder_embed_dim
        total = vit_flops(enc, size, visible=keep, with_head=False)
        total += _linear(keep + npt, enc.embed_dim, dd)  # decoder_embed
        total += _blocks(n + npt, dd, model.decoder_num_heads, model.decoder_mlp_hidden_dim, model.decoder_depth)
        p = enc.patch_embed.patch_size
        total += _linear(n + npt, dd, p[0] * p[1] * model.in_chans)  # decoder_pred
        return int(total)
    if isinstance(model, VisionTransformer):
        if mask_ratio is not None:
            raise ValueError("mask_ratio applies to MAE models only")
        size = to_2tuple(img_size) if img_size is not None else model.patch_embed.img_size
        return int(vit_flops(model, size))
    raise TypeError(f"forward_flops supports VisionTransformer and MaskedAutoencoderViT, got {type(model).__name__}")


def count_params(name: str, trainable_only: bool = False, **kwargs: Any) -> int:
    """Parameter count of a registered model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
