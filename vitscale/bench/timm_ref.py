"""timm reference models with the same configuration as ours, for ``vitscale bench``'s speed ratio.

Supervised: ``timm.models.vision_transformer.VisionTransformer`` with our width, depth, heads, MLP width, patch
size, image size, pooling and classes. MAE: the paper's reference code (facebookresearch/mae ``models_mae.py``)
built from timm's ``Block`` and ``PatchEmbed`` — the "timm-block MAE" of the reference GPU figures — with our
encoder and decoder sizes. Position tables are zeros (frozen): their values do not change the cost.
"""
from __future__ import annotations

import importlib
from functools import partial
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from vitscale.errors import ConfigError
from vitscale.models.freeze import freeze
from vitscale.models.mae import tokens_kept
from vitscale.models.vit import VisionTransformer


_ln = partial(nn.LayerNorm, eps=1e-6)  # timm passes device/dtype keywords to its norm layer


class TimmBlockMAE(nn.Module):
    """MAE as in the paper's code: encoder on visible patches + [CLS], light decoder, MSE on masked patches."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int,
                 decoder_mlp_ratio: float, norm_pix_loss: bool, mask_ratio: float = 0.75):
        super().__init__()
        # startup: timm adds 4.4 s to torch's import (measured, 2 cores); only this use needs it
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.patch_size, self.in_chans, self.norm_pix_loss = patch_size, in_chans, norm_pix_loss
        self.mask_ratio = mask_ratio  # as ours: stored once, used when a call gives none
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_ln)
                                     for _ in range(depth)])
        self.norm = _ln(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=_ln)
            for _ in range(decoder_depth)])
        self.decoder_norm = _ln(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable  # as timm: each block recomputed in backward

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], self.in_chans, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p ** 2 * self.in_chans)

    def random_masking(self, x: torch.Tensor, mask_ratio: float):
        N, L, D = x.shape
        len_keep = tokens_kept(L, mask_ratio)
        noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_masked = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float):
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        return self.norm(self._blocks(self.blocks, x)), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_norm(self._blocks(self.decoder_blocks, x)))[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: Optional[float] = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, self.mask_ratio if mask_ratio is None else mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def no_timm_reference(ours: nn.Module, objective: Any, frozen: str = "") -> Optional[str]:
    """Why timm has no model to compare ``ours`` with (bench then skips the timm row, saying so), or None.
    ``frozen``: model.freeze, which timm's model must take under its own parameter names."""
    if hasattr(getattr(objective.encoder(ours), "patch_embed", None), "backbone"):
        return "timm has no reference for hybrid (ResNet-stem) models"
    if hasattr(getattr(objective.encoder(ours), "pre_logits", None), "fc"):
        return "timm's ViT has no pre-logits layer (model.representation_size) any more"
    if objective.timm_reference.endswith(":timm_vit") and not isinstance(ours, VisionTransformer):
        # a plugin objective's model around a ViT: timm's plain ViT would time another computation
        return (f"objective {objective.name!r} builds a {type(ours).__name__}, not a plain ViT, and names no "
                f"timm_reference of its own")
    if frozen:
        with torch.device("meta"):
            theirs = timm_reference(ours, objective)
        try:
            freeze(theirs, frozen)
        except ConfigError:  # e.g. an MAE's "encoder.blocks.0": timm's MAE has no encoder. prefix
            return f"model.freeze={frozen!r} names no parameter of timm's model"
    return None


def timm_reference(ours: nn.Module, objective: Any, drop_path: float = 0.0) -> nn.Module:
    """A timm model with ``ours``' configuration: the builder ``objective.timm_reference`` names (an import path,
    so an objective chooses its reference without importing the benchmarks). Check :func:`no_timm_reference`
    first."""
    module, _, attr = objective.timm_reference.partition(":")
    return getattr(importlib.import_module(module), attr)(ours, drop_path)


def timm_block_mae(ours: nn.Module, drop_path: float = 0.0) -> nn.Module:
    """The MAE paper's code built from timm blocks, sized as ``ours`` (a vitscale MAE)."""
    enc = ours.encoder
    return TimmBlockMAE(enc.patch_embed.img_size[0], enc.patch_embed.patch_size[0], ours.in_chans, enc.embed_dim,
                        enc.depth, enc.num_heads, enc.mlp_hidden_dim / enc.embed_dim, ours.decoder_embed_dim,
                        ours.decoder_depth, ours.decoder_num_heads,
                        ours.decoder_mlp_hidden_dim / ours.decoder_embed_dim, ours.norm_pix_loss, ours.mask_ratio)


def timm_vit(ours: nn.Module, drop_path: float = 0.0) -> nn.Module:
    """timm's VisionTransformer sized as ``ours`` (a vitscale VisionTransformer)."""
    # startup: timm adds 4.4 s to torch's import (measured, 2 cores); only this use needs it
    from timm.models.vision_transformer import VisionTransformer

    enc = ours
    return VisionTransformer(img_size=enc.patch_embed.img_size[0], patch_size=enc.patch_embed.patch_size[0],
                             in_chans=enc.in_chans, num_classes=enc.num_classes,
                             global_pool=enc.global_pool, embed_dim=enc.embed_dim, depth=enc.depth,
                             num_heads=enc.num_heads, mlp_ratio=enc.mlp_hidden_dim / enc.embed_dim, qkv_bias=True,
                             class_token=enc.has_class_token, drop_path_rate=drop_path,
                             reg_tokens=enc.num_reg_tokens,
                             qk_norm=not isinstance(enc.blocks[0].attn.q_norm, nn.Identity),
                             norm_layer=_ln)
