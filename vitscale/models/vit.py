"""Vision Transformer with timm's API and parameter names (weights load into timm's ViT and back).

Model code only: no ranks, engines or files. Construction is a pure function of the torch RNG.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from vitscale.models.embed import HybridEmbed, PatchEmbed
from vitscale.models.flops import vit_flops
from vitscale.models.layers import Block, LayerNorm, Linear, checkpoint_count, run_blocks
from vitscale.models.pos_embed import resize_pos_embed, sincos_2d

POOLS = ("token", "avg")
POS_EMBEDS = ("learn", "sincos", "none")


def mlp_hidden(dim: int, mlp_ratio: float) -> int:
    """int(dim * ratio) like timm, robust to float error for exact fractional ratios (48/11, 64/13, 60/7)."""
    return int(dim * mlp_ratio + 1e-6)


def _check_options(global_pool: str, pos_embed: str, class_token: bool, reg_tokens: int) -> None:
    """One line naming the first option a VisionTransformer cannot be built with."""
    if global_pool not in POOLS:
        raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' needs class_token=True (use global_pool='avg')")
    if reg_tokens < 0:
        raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al.) with pre-norm blocks.

    Args mirror timm's ``VisionTransformer``. ``pos_embed``: "learn" (trainable table), "sincos" (fixed 2-D
    sin-cos table, stored as a frozen parameter so the key still exists) or "none". ``global_pool``: "token"
    ([CLS]) or "avg" (mean of patch tokens; then, as in timm, the final LayerNorm is ``fc_norm`` after pooling
    and ``norm`` is an identity, unless ``fc_norm`` says otherwise). ``init_values`` enables LayerScale.
    ``hybrid_layers`` swaps the patch embedding for a BiT ResNet stem with those stage depths. ``head_norm`` puts
    a BatchNorm without affine parameters before the head (MAE's linear probe; it folds into the head on export).
    ``qk_norm`` adds timm's per-head LayerNorm on queries and keys. ``reg_tokens`` prepends that many learned
    register tokens (Darcet et al., "Vision Transformers Need Registers") after [CLS]; as in timm's default
    (``no_embed_class=False``) the position table has a row for every prefix token, [CLS] and registers included.
    Prefix tokens are ``[CLS], reg_1..reg_R`` then the patches; ``num_prefix_tokens`` counts them all, so pooling,
    masking and analysis that skip the prefix skip the registers too. ``representation_size`` adds the ViT paper's
    pre-training head's hidden layer (``pre_logits``: a dense layer to that width and tanh, before the classifier;
    the paper fine-tunes without it; timm's older ``representation_size``).
    """

    def __init__(self, img_size: Union[int, tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, class_token: bool = True,
                 global_pool: str = "token", pos_embed: str = "learn", init_values: Optional[float] = None,
                 drop_path_rate: float = 0.0, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, fc_norm: Optional[bool] = None, dynamic_img_size: bool = False,
                 hybrid_layers: Optional[Sequence[int]] = None, head_norm: bool = False, qk_norm: bool = False,
                 reg_tokens: int = 0, representation_size: Optional[int] = None):
        super().__init__()
        _check_options(global_pool, pos_embed, class_token, reg_tokens)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_hidden_dim = mlp_hidden(embed_dim, mlp_ratio)
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.has_class_token = class_token
        self.pos_embed_type = pos_embed
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.checkpoint_blocks = 0  # leading blocks recomputed in backward (set_grad_checkpointing)

        if hybrid_layers:
            self.patch_embed = HybridEmbed(img_size, patch_size, in_chans, embed_dim, layers=tuple(hybrid_layers),
                                           strict_img_size=not dynamic_img_size)
        else:
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                          strict_img_size=not dynamic_img_size)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, reg_tokens, embed_dim)) if reg_tokens else None
        if pos_embed == "none":
            self.pos_embed = None
        else:
            self.pos_embed = nn.Parameter(torch.empty(1, num_patches + self.num_prefix_tokens, embed_dim),
                                          requires_grad=pos_embed == "learn")
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth, linear in depth
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, init_values=init_values, drop_path=dpr[i],
                  proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, mlp_hidden_dim=self.mlp_hidden_dim,
                  qk_norm=qk_norm)
            for i in range(depth)])
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim)
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_hidden_size = representation_size or embed_dim  # what the classifier reads (timm's name)
        self.pre_logits = nn.Sequential(OrderedDict(fc=Linear(embed_dim, representation_size), act=nn.Tanh())) \
            if representation_size else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head_norm = nn.BatchNorm1d(self.head_hidden_size, affine=False, eps=1e-6) if head_norm else nn.Identity()
        self.head = Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self._init_tokens()

    # ----- init / resizing -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_tokens(self) -> None:
        # Leaf layers initialise themselves (layers.Linear, embed.PatchConv2d); only the tokens are left.
        if self.pos_embed is not None:
            if self.pos_embed_type == "sincos":
                self.pos_embed.copy_(sincos_2d(self.embed_dim, self.patch_embed.grid_size, self.num_prefix_tokens,
                                               device=self.pos_embed.device)[None])
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)  # timm's choice: registers start near zero

    @torch.no_grad()
    def set_input_size(self, img_size: Union[int, tuple[int, int]]) -> None:
        """Change the input resolution: the position table is resized (learned: bicubic; sincos: rebuilt)."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_img_size(img_size)
        new_grid = self.patch_embed.grid_size
        if self.pos_embed is None:
            return
        if self.pos_embed_type == "sincos":
            table = sincos_2d(self.embed_dim, new_grid, self.num_prefix_tokens, device=self.pos_embed.device)[None]
        else:
            table = resize_pos_embed(self.pos_embed.data, new_grid, self.num_prefix_tokens, old_grid=old_grid)
        self.pos_embed = nn.Parameter(table.to(self.pos_embed.dtype), requires_grad=self.pos_embed.requires_grad)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in POOLS or (global_pool == "token" and not self.has_class_token):
                raise ValueError(f"bad global_pool {global_pool!r}")
            self.global_pool = global_pool
        self.head = Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    # ----- timm API ------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: Union[bool, int] = True) -> None:
        """Recompute blocks in backward (only while training): True = every block, an int N = the first N blocks
        (the dial between memory and speed), False or 0 = none."""
        self.checkpoint_blocks = checkpoint_count(enable, self.depth)
        self.grad_checkpointing = self.checkpoint_blocks > 0

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} | ({"reg_token"} if self.reg_token is not None else set())

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters into stem / blocks / final norm (timm's layer-decay interface)."""
        return dict(stem=r"^cls_token|^reg_token|^pos_embed|^patch_embed",
                    blocks=r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def prefix_tokens(self, batch: int) -> Optional[torch.Tensor]:
        """[CLS] and the register tokens, (batch, num_prefix_tokens, D), without position rows; None if neither."""
        parts = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if len(parts) < 2:  # a cat of one part is a copy (and a CatBackward) per step that timm does not pay
            return parts[0] if parts else None
        return torch.cat(parts, dim=1)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens + [CLS] + registers + position table: (B, prefix + N, D)."""
        h, w = x.shape[-2:]
        x = self.patch_embed(x)
        grid = (h // self.patch_embed.patch_size[0], w // self.patch_embed.patch_size[1])
        prefix = self.prefix_tokens(x.shape[0])
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if grid != self.patch_embed.grid_size:  # only reachable with dynamic_img_size
                pos = resize_pos_embed(pos, grid, self.num_prefix_tokens, old_grid=self.patch_embed.grid_size)
            x = x + pos
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        x = run_blocks(self.blocks, x, self.checkpoint_blocks if self.training and self.grad_checkpointing else 0)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pre_logits(self.fc_norm(self.pool(x))))
        return x if pre_logits else self.head(self.head_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ----- interpretability ----------------------------------------------------------------------------------
    def get_attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention probabilities of every block: a list of ``depth`` tensors (B, heads, N, N).

        N includes the prefix tokens first ([CLS] at index 0 when the model has one, then the registers). Wrap in ``torch.no_grad()`` for analysis.
        """
        x = self._embed(x)
        maps = []
        for blk in self.blocks:
            x, attn = blk(x, return_attn=True)
            maps.append(attn)
        return maps

    # ----- cost ----------------------------------------------------------------------------------------------
    def forward_flops(self, img_size: Optional[tuple[int, int]] = None, mask_ratio: Optional[float] = None) -> int:
        """Analytic forward FLOPs per image at ``img_size`` (default: the model's); see :mod:`vitscale.models.flops`."""
        if mask_ratio is not None:
            raise ValueError("mask_ratio applies to MAE models only")
        return int(vit_flops(self, img_size or self.patch_embed.img_size))
