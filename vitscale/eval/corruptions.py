"""Common corruptions (after Hendrycks & Dietterich's ImageNet-C / CIFAR-10-C) at severities 1-5, on float
images in [0, 1] (B, 3, H, W). Severity 0 is the identity, so every curve starts at the clean accuracy.

Parameters follow CIFAR-10-C (the small-image variant), which suits 32-64 px inputs; corruptions that need
external assets (frost, fog textures) or per-image geometric warps (elastic, zoom) are left out. All randomness
comes from the ``torch.Generator`` passed in, so a curve is a pure function of the seed.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

SEVERITIES = 5

# Severity 1..5 parameter of each corruption (CIFAR-10-C values where it has them).
PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of added noise
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity (Poisson)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of salt-and-pepper pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma in pixels at 32 px (scaled with image size)
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards each image's mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to every channel
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-sampling factor, then nearest up-sampling
}
CORRUPTIONS = tuple(PARAMS)


def _gaussian_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return (x + c * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _shot_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return (torch.poisson(x * c, generator=g) / c).clamp(0, 1)


def _impulse_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    # Per pixel and channel, as skimage's random_noise(mode="s&p"): half salt (1), half pepper (0).
    hit = torch.rand(x.shape, generator=g) < c
    salt = torch.rand(x.shape, generator=g) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def _gaussian_blur(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    sigma = c * x.shape[-1] / 32
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(x, [k, k], [sigma, sigma]).clamp(0, 1)


def _contrast(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, 1)


def _brightness(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return (x + c).clamp(0, 1)


def _jpeg(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg

    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs (for torchcodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        out = [decode_jpeg(encode_jpeg(img.contiguous(), quality=int(c))) for img in u8]
    return torch.stack(out).float().div(255)


def _pixelate(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


_FUNCS: dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur, "contrast": _contrast, "brightness": _brightness, "jpeg": _jpeg,
    "pixelate": _pixelate,
}


def check_corruptions(names) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in PARAMS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}: choose from {', '.join(CORRUPTIONS)}")
    return names


def corrupt(x: torch.Tensor, name: str, severity: int, g: torch.Generator) -> torch.Tensor:
    """``x`` (B, 3, H, W) float in [0, 1] corrupted by ``name`` at ``severity`` (0 = unchanged, 1..5)."""
    check_corruptions([name])
    if not 0 <= severity <= SEVERITIES:
        raise ValueError(f"severity must be 0..{SEVERITIES}, got {severity}")
    if severity == 0:
        return x
    return _FUNCS[name](x, PARAMS[name][severity - 1], g)
