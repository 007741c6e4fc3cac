"""Analytic forward FLOPs and parameter counts (no forward pass, no memory).

FLOPs count matmuls and convolutions as 2*M*N*K, like ``torch.utils.flop_counter.FlopCounterMode``;
norms, activations, softmax and elementwise ops are not counted. Training costs ~3x the forward, less with frozen
parameters (:func:`train_flops`).
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


# A model's forward FLOPs per image part by part, in forward order: (prefixes of the part's parameter names, FLOPs).
Parts = list[tuple[tuple[str, ...], int]]


def vit_flop_parts(vit: nn.Module, img_size: tuple[int, int], visible: Optional[int] = None,
                   with_head: bool = True, prefix: str = "") -> Parts:
    """:func:`vit_flops` part by part: the embedding (with [CLS], registers and position table), each block, and
    the final norms with the head; ``prefix`` is the ViT's name inside a larger model (e.g. "encoder.")."""
    n = num_patches(vit, img_size) if visible is None else visible
    block = blocks_flops(n + vit.num_prefix_tokens, vit.embed_dim, vit.num_heads, vit.mlp_hidden_dim, 1)
    pre = getattr(getattr(vit, "pre_logits", None), "fc", None)  # the ViT paper's pre-training hidden layer
    width = pre.out_features if pre is not None else vit.embed_dim
    head = ((linear_flops(1, width, vit.num_classes) if vit.num_classes > 0 else 0)
            + (linear_flops(1, vit.embed_dim, width) if pre is not None else 0)) if with_head else 0

    def names(*parts: str) -> tuple[str, ...]:
        return tuple(prefix + x for x in parts)

    return [(names("patch_embed", "cls_token", "reg_token", "pos_embed"), _embed(vit, img_size)),
            *[(names(f"blocks.{i}"), block) for i in range(vit.depth)],
            (names("norm", "fc_norm", "pre_logits", "head_norm", "head"), head)]


def vit_flops(vit: nn.Module, img_size: tuple[int, int], visible: Optional[int] = None,
              with_head: bool = True) -> int:
    """Encoder FLOPs per image; ``visible`` = patch tokens that enter the blocks (default: all)."""
    return sum(f for _, f in vit_flop_parts(vit, img_size, visible, with_head))


def train_flops(model: nn.Module, parts: Parts) -> int:
    """Forward + backward FLOPs per image of a training step, from the forward FLOPs of ``model``'s ``parts``.

    A part's backward costs its forward once for the gradients of its own weights, if any of them trains, and once
    for the gradient of its input, if any parameter at or below it trains (a part that contains the first trainable
    parameter is counted whole, as 3 x forward counts the patch embedding's). With nothing frozen this is the usual
    3 x forward; with ``model.freeze=encoder`` the encoder is a forward alone and only the head has a backward."""
    model = unwrap(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    total, below = 0, False
    for prefixes, flops in parts:
        own = any(n == pre or n.startswith(pre + ".") for n in trained for pre in prefixes)
        below = below or own
        total += flops * (1 + int(own) + int(below))
    return total


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a wrapper such as a DeepSpeed engine (``.module``); the model itself otherwise."""
    if not hasattr(model, "forward_flops") and isinstance(getattr(model, "module", None), nn.Module):
        return model.module
    return model


def forward_flops(model: nn.Module, img_size: Union[int, tuple[int, int], None] = None,
                  mask_ratio: Optional[float] = None) -> int:
    """Forward FLOPs for one image: the model's own ``forward_flops`` (every vitscale model has one; an MAE's
    ``mask_ratio`` defaults to its own, a plain ViT takes none). A wrapper (e.g. a DeepSpeed engine) is unwrapped."""
    model = unwrap(model)
    if not hasattr(model, "forward_flops"):
        raise TypeError(f"forward_flops supports vitscale's models, got {type(model).__name__}")
    size = to_2tuple(img_size) if img_size is not None else None
    return int(model.forward_flops(size, mask_ratio=mask_ratio))
