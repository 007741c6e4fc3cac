"""Image -> token embeddings: the ViT patch embedding (and the hybrid ResNet stem, below)."""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.models.layers import xavier_uniform_fp32_
from vitscale.models.pos_embed import to_2tuple


class PatchConv2d(nn.Conv2d):
    """Patchify convolution initialised like a Linear over the flattened patch (xavier-uniform, zero bias)."""

    def reset_parameters(self) -> None:
        w = self.weight
        xavier_uniform_fp32_(w.view(w.shape[0], -1))
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


# ----- hybrid: BiT ResNet stem + 1x1 projection ------------------------------------------------------------------
class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (BiT): each filter is normalised to zero mean, unit variance."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.flatten(1)
        w = (w - w.mean(dim=1, keepdim=True)) / torch.sqrt(w.var(dim=1, unbiased=False, keepdim=True) + self.eps)
        return F.conv2d(x, w.view_as(self.weight), None, self.stride, self.padding, self.dilation, self.groups)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm(32) followed by an optional ReLU; ``zero_init`` starts the scale at 0 (last norm of a block)."""

    def __init__(self, channels: int, act: bool = True, zero_init: bool = False, num_groups: int = 32):
        self.zero_init = zero_init
        super().__init__(num_groups, channels, eps=1e-5)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class DownsampleConv(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv = StdConv2d(in_chs, out_chs, 1, stride=stride)
        self.norm = GroupNormAct(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Post-activation bottleneck (1x1 -> 3x3 (stride) -> 1x1) with a projection shortcut when shapes change."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        mid = out_chs // 4
        self.downsample = DownsampleConv(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else None
        self.conv1 = StdConv2d(in_chs, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2d(mid, out_chs, 1)
        self.norm3 = GroupNormAct(out_chs, act=False, zero_init=True)
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm3(self.conv3(self.norm2(self.conv2(self.norm1(self.conv1(x))))))
        return self.act3(x + shortcut)


class ResNetStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(*[Bottleneck(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1)
                                      for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetStem(nn.Module):
    """BiT ResNet-v2-style backbone without head: 7x7/2 conv + GN + ReLU + 3x3/2 max-pool, then bottleneck stages
    (widths 256, 512, 1024, ...; the first stage keeps the resolution, each later one halves it)."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 9), in_chans: int = 3, stem_chs: int = 64):
        super().__init__()
        self.layers = tuple(layers)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", StdConv2d(in_chans, stem_chs, 7, stride=2))
        self.stem.add_module("norm", GroupNormAct(stem_chs))
        self.stem.add_module("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.stages = nn.Sequential()
        chs = stem_chs
        for i, depth in enumerate(self.layers):
            out = 256 * 2 ** i
            self.stages.add_module(str(i), ResNetStage(chs, out, depth, 1 if i == 0 else 2))
            chs = out
        self.num_features = chs
        self.stride = 4 * 2 ** (len(self.layers) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def flops(self, img_size: tuple[int, int]) -> int:
        """Conv FLOPs (2*MACs) for one image."""
        def out(n: int, k: int, s: int) -> int:
            return (n + 2 * (k // 2) - k) // s + 1

        h, w = out(img_size[0], 7, 2), out(img_size[1], 7, 2)
        total = 2 * h * w * self.stem.conv.out_channels * self.stem.conv.in_channels * 49
        h, w = out(h, 3, 2), out(w, 3, 2)
        for stage in self.stages:
            for blk in stage.blocks:
                cin, mid, cout, s = blk.conv1.in_channels, blk.conv1.out_channels, blk.conv3.out_channels, \
                    blk.conv2.stride[0]
                total += 2 * h * w * cin * mid  # conv1 at the input resolution
                h, w = out(h, 3, s), out(w, 3, s)
                total += 2 * h * w * (mid * mid * 9 + mid * cout)  # conv2, conv3
                if blk.downsample is not None:
                    total += 2 * h * w * cin * cout
        return total


class HybridEmbed(nn.Module):
    """Hybrid ViT embedding: a ResNet stem, then a 1x1 ``proj`` conv to ``embed_dim`` on its feature map.

    ``patch_size`` is the stem's total stride in pixels (16 for three stages), so one token covers a 16x16
    pixel patch as in a plain ViT-*/16 (and MAE can patchify targets the same way). Key names follow timm's
    ``vit_*_r50_s16_*`` models (``backbone.stem.conv``, ``backbone.stages.0.blocks.0.conv1``, ``proj``).
    """

    def __init__(self, img_size: Union[int, tuple[int, int]] = 224, patch_size: Union[int, tuple[int, int]] = 16,
                 in_chans: int = 3, embed_dim: int = 768, layers: tuple[int, ...] = (3, 4, 9),
                 strict_img_size: bool = True):
        super().__init__()
        self.backbone = ResNetStem(layers, in_chans)
        stride = self.backbone.stride
        if to_2tuple(patch_size) != (stride, stride):
            raise ValueError(f"hybrid stem with stages {tuple(layers)} has stride {stride}: use patch_size={stride}, "
                             f"not {patch_size}")
        self.patch_size = (stride, stride)
        self.strict_img_size = strict_img_size
        self.set_img_size(img_size)
        self.proj = PatchConv2d(self.backbone.num_features, embed_dim, kernel_size=1)

    _check = PatchEmbed._check
    set_img_size = PatchEmbed.set_img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2], x.shape[-1])
        if self.strict_img_size and size != self.img_size:
            raise ValueError(f"input size {size} does not match the model's img_size {self.img_size}")
        self._check(size)
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)

    def flops(self, img_size: tuple[int, int]) -> int:
        gh, gw = img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]
        return self.backbone.flops(img_size) + 2 * gh * gw * self.proj.in_channels * self.proj.out_channels
