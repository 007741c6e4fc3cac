"""Image -> token embeddings: the ViT patch embedding (and the hybrid ResNet stem, below)."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from vitscale.models.pos_embed import to_2tuple


class PatchConv2d(nn.Conv2d):
    """Patchify convolution initialised like a Linear over the flattened patch (xavier-uniform, zero bias)."""

    def reset_parameters(self) -> None:
        w = self.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping ``patch_size`` patches and project each to ``embed_dim``.

    Output is (B, num_patches, embed_dim), patches in row-major order. ``img_size`` must be divisible by
    the patch size; with ``strict_img_size`` other input sizes are an error, otherwise any divisible size works.
    """

    def __init__(self, img_size: Union[int, tuple[int, int]] = 224, patch_size: Union[int, tuple[int, int]] = 16,
                 in_chans: int = 3, embed_dim: int = 768, bias: bool = True, strict_img_size: bool = True):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.strict_img_size = strict_img_size
        self._check(self.img_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = PatchConv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def _check(self, size: tuple[int, int]) -> None:
        if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
            raise ValueError(f"image size {size} is not divisible by patch size {self.patch_size}")

    def set_img_size(self, img_size: Union[int, tuple[int, int]]) -> None:
        self.img_size = to_2tuple(img_size)
        self._check(self.img_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2], x.shape[-1])
        if self.strict_img_size and size != self.img_size:
            raise ValueError(f"input size {size} does not match the model's img_size {self.img_size}")
        self._check(size)
        return self.proj(x).flatten(2).transpose(1, 2)
