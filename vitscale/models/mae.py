"""Masked autoencoder (He et al., 2021) around a timm-compatible ViT encoder.

Method names follow the paper's code (patchify, random_masking, forward_encoder, forward_decoder,
forward_loss). The encoder is a plain ``VisionTransformer`` held as ``self.encoder`` (no head), so
``model.encoder.state_dict()`` has timm keys and loads into ``timm``'s ViT with ``num_classes=0``.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Optional, Union

import torch
from torch import nn

from vitscale.config.schema import ObjectiveConfig
from vitscale.models.flops import Parts, blocks_flops, linear_flops, num_patches, vit_flop_parts
from vitscale.models.layers import Block, LayerNorm, Linear, checkpoint_count, run_blocks
from vitscale.models.pos_embed import sincos_2d
from vitscale.models.vit import VisionTransformer, mlp_hidden

_DEFAULTS = ObjectiveConfig()  # the schema is the one home of the MAE options' defaults


def tokens_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees per image: the one formula (the masking, FLOPs, the planner, the benchmarks).

    floor(L x (1 - mask_ratio)) as the MAE paper's code, but on the ratio as written (its shortest decimal form,
    exactly): in floats 100 x (1 - 0.9) is 9.999999999999998, which the paper's int() floors to 9, not 10."""
    return math.floor(num_patches * (1 - Fraction(repr(float(mask_ratio)))))


class MaskedAutoencoderViT(nn.Module):
    """MAE: the encoder sees only the visible patches (+[CLS] and registers, never masked); a light decoder
    reconstructs all patches."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0, decoder_embed_dim: int = 512,
                 decoder_depth: int = 8, decoder_num_heads: int = 16, decoder_mlp_ratio: Optional[float] = None,
                 norm_pix_loss: bool = _DEFAULTS.norm_pix_loss, mask_ratio: float = _DEFAULTS.mask_ratio,
                 **encoder_kwargs: Any):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        enc_args: dict[str, Any] = dict(num_classes=0, pos_embed="sincos", fc_norm=False)
        enc_args.update(encoder_kwargs)
        enc_args.setdefault("global_pool", "token" if enc_args.get("class_token", True) else "avg")
        self.encoder = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                         embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                         mlp_ratio=mlp_ratio, **enc_args)
        enc = self.encoder
        self.in_chans = in_chans
        self.patch_size = enc.patch_embed.patch_size[0]
        self.num_prefix_tokens = enc.num_prefix_tokens
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_depth = decoder_depth
        self.decoder_num_heads = decoder_num_heads
        self.decoder_mlp_hidden_dim = mlp_hidden(decoder_embed_dim, decoder_mlp_ratio or mlp_ratio)
        self.grad_checkpointing = False
        self.decoder_checkpoint_blocks = 0

        num_patches = enc.patch_embed.num_patches
        self.decoder_embed = Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.empty(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.empty(1, num_patches + self.num_prefix_tokens,
                                                          decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, qkv_bias=True, mlp_hidden_dim=self.decoder_mlp_hidden_dim)
            for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        p = enc.patch_embed.patch_size
        self.decoder_pred = Linear(decoder_embed_dim, p[0] * p[1] * in_chans)
        with torch.no_grad():
            nn.init.normal_(self.mask_token, std=0.02)
            self.decoder_pos_embed.copy_(sincos_2d(decoder_embed_dim, enc.patch_embed.grid_size,
                                                   self.num_prefix_tokens, device=self.decoder_pos_embed.device)[None])

    # ----- API shared with the ViT ---------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.Sequential:
        return self.encoder.blocks

    def set_grad_checkpointing(self, enable: Union[bool, int] = True) -> None:
        """Recompute blocks in backward (only while training): True = every encoder and decoder block, an int N =
        the first N blocks in forward order (encoder blocks first, then decoder blocks), False or 0 = none."""
        n = checkpoint_count(enable, self.encoder.depth + self.decoder_depth)
        self.encoder.set_grad_checkpointing(min(n, self.encoder.depth))
        self.decoder_checkpoint_blocks = n - self.encoder.checkpoint_blocks
        self.grad_checkpointing = n > 0

    def no_weight_decay(self) -> set[str]:
        return {"encoder." + n for n in self.encoder.no_weight_decay()} | {"mask_token", "decoder_pos_embed"}

    # ----- patches -------------------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), each patch flattened in (row, col, channel) order."""
        B, C, H, W = imgs.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {(H, W)} is not divisible by patch size {p}")
        h, w = H // p, W // p
        x = imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor, grid_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W); the grid defaults to the model's (or a square one)."""
        B, L, _ = x.shape
        p, C = self.patch_size, self.in_chans
        if grid_size is None:
            grid_size = self.encoder.patch_embed.grid_size
            if grid_size[0] * grid_size[1] != L:
                side = int(round(L ** 0.5))
                grid_size = (side, side)
        h, w = grid_size
        if h * w != L:
            raise ValueError(f"{L} patches do not fit grid {grid_size}")
        x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, h * p, w * p)

    def random_masking(self, x: torch.Tensor, mask_ratio: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` of each sample's tokens (per-sample shuffle by argsort of noise).

        Returns (x_visible (B, len_keep, D), mask (B, L) with 1 = masked, ids_restore (B, L)).
        The noise comes from ``torch.rand`` on x's device, so the global RNG drives it.
        """
        B, L, D = x.shape
        len_keep = tokens_kept(L, mask_ratio)
        noise = torch.rand(B, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_visible = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
        mask = torch.ones(B, L, device=x.device, dtype=torch.float32)  # fp32 even in bf16: exact counts
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_visible, mask, ids_restore

    # ----- forward -------------------------------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder
        npt = self.num_prefix_tokens
        x = enc.patch_embed(imgs)
        pos = enc.pos_embed
        if pos is not None:
            x = x + pos[:, npt:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)  # patches only: [CLS] and registers always stay
        prefix = enc.prefix_tokens(x.shape[0])
        if prefix is not None:
            x = torch.cat([prefix if pos is None else prefix + pos[:, :npt], x], dim=1)
        x = enc.pos_drop(x)
        x = run_blocks(enc.blocks, x, enc.checkpoint_blocks if self.training and self.grad_checkpointing else 0)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        npt = self.num_prefix_tokens
        x = self.decoder_embed(latent)
        B, L = ids_restore.shape
        visible = x[:, npt:]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L - visible.shape[1], -1)
        x_ = torch.cat([visible, mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :npt], x_], dim=1) + self.decoder_pos_embed
        x = run_blocks(self.decoder_blocks, x,
                       self.decoder_checkpoint_blocks if self.training and self.grad_checkpointing else 0)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, npt:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the masked patches only (targets per-patch normalised with norm_pix_loss).

        Computed in fp32 whatever the model's dtype (large bf16 sums lose precision)."""
        target = self.patchify(imgs).float()
        pred = pred.float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    def forward(self, imgs: torch.Tensor, mask_ratio: Optional[float] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred (B, L, p*p*C), mask (B, L) with 1 = masked)."""
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ----- cost ----------------------------------------------------------------------------------------------
    def forward_flops(self, img_size: Optional[tuple[int, int]] = None, mask_ratio: Optional[float] = None) -> int:
        """Forward FLOPs per image: the encoder on the kept patches (+ prefix tokens), the decoder on all of them;
        ``mask_ratio`` defaults to the model's own."""
        return int(sum(f for _, f in self.flop_parts(img_size, mask_ratio)))

    def flop_parts(self, img_size: Optional[tuple[int, int]] = None, mask_ratio: Optional[float] = None) -> Parts:
        """:meth:`forward_flops` part by part in forward order, each named by its parameters' prefixes (what
        :func:`vitscale.models.flops.train_flops` needs to leave frozen parts out of the backward)."""
        enc = self.encoder
        size = img_size or enc.patch_embed.img_size
        n = num_patches(enc, size)
        keep = tokens_kept(n, self.mask_ratio if mask_ratio is None else mask_ratio)
        npt, dd = self.num_prefix_tokens, self.decoder_embed_dim
        block = blocks_flops(n + npt, dd, self.decoder_num_heads, self.decoder_mlp_hidden_dim, 1)
        p = enc.patch_embed.patch_size
        return [*vit_flop_parts(enc, size, visible=keep, with_head=False, prefix="encoder."),
                (("decoder_embed", "mask_token", "decoder_pos_embed"), linear_flops(keep + npt, enc.embed_dim, dd)),
                *[((f"decoder_blocks.{i}",), block) for i in range(self.decoder_depth)],
                (("decoder_norm", "decoder_pred"), linear_flops(n + npt, dd, p[0] * p[1] * self.in_chans))]
