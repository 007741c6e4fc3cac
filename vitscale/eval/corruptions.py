"""Common corruptions (after Hendrycks & Dietterich's ImageNet-C / CIFAR-10-C) at severities 1-5, on float
images in [0, 1] (B, 3, H, W). Severity 0 is the identity, so every curve starts at the clean accuracy.

Parameters follow CIFAR-10-C (the small-image variant), which suits 32-64 px inputs, and so do the formulas they
belong to (Hendrycks & Dietterich's ``make_cifar_c.py``): a parameter means what it means there only with its own
formula, e.g. brightness adds to the HSV value channel (which keeps saturation), not to R, G and B. Corruptions that
need external assets (frost, fog textures) or per-image geometric warps (elastic, zoom) are left out. All randomness
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
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards each image's per-channel mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value (V) channel, clipped to [0, 1]
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


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, each channel in [0, 1], as ``skimage.color.rgb2hsv`` (which CIFAR-10-C
    uses): hue 0 and saturation 0 for grey pixels; on ties for the largest channel blue wins over green over red."""
    r, g, b = x.unbind(1)
    v = x.amax(dim=1)
    delta = v - x.amin(dim=1)
    grey = delta == 0
    safe = torch.where(grey, torch.ones_like(delta), delta)  # no 0/0 in the branches torch.where discards
    s = torch.where(grey, torch.zeros_like(v), delta / torch.where(grey, torch.ones_like(v), v))
    h = torch.where(b == v, 4 + (r - g) / safe, torch.where(g == v, 2 + (b - r) / safe, (g - b) / safe))
    h = torch.where(grey, torch.zeros_like(h), torch.remainder(h / 6, 1.0))
    return torch.stack([h, s, v], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV in [0, 1] -> RGB, as ``skimage.color.hsv2rgb`` (the inverse of :func:`rgb_to_hsv`)."""
    h, s, v = hsv.unbind(1)
    sector = torch.floor(h * 6)
    f = h * 6 - sector
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = torch.stack([torch.stack(c, dim=1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                       (v, p, q))])  # (6 sectors of the hue circle, B, 3, H, W)
    idx = torch.remainder(sector.long(), 6)[None, :, None].expand(1, *hsv.shape)
    return rgb.gather(0, idx)[0]


def _contrast(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    # CIFAR-10-C: towards each channel's own mean over the image (a colour cast stays, only its spread shrinks)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, 1)


def _brightness(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    # CIFAR-10-C: V + c in HSV, clipped; every channel of a pixel scales by the same factor, so colours keep their
    # saturation (adding c to R, G and B washed them out, a stronger corruption than the severity says)
    hsv = rgb_to_hsv(x)
    hsv = torch.cat([hsv[:, :2], (hsv[:, 2:] + c).clamp(0, 1)], dim=1)
    return hsv_to_rgb(hsv).clamp(0, 1)


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
