"""Decode and augment images as uint8 tensors. All randomness comes from an explicit ``torch.Generator``.

Batches stay uint8 (B,3,H,W) through the DataLoader (4x less inter-process traffic than float); the trainer calls
:func:`normalize` on the device.
"""
from __future__ import annotations

import io
import math
import warnings

import torch
# Imported here (not per call) so DataLoader workers forked from the trainer inherit them ready to use.
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875


class DecodeError(ValueError):
    """The bytes are not a readable image."""


def _decode_pil(data: bytes) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode(data: bytes) -> torch.Tensor:
    """Image bytes (PNG/JPEG/WebP/...) -> uint8 tensor (3,H,W), RGB. Grayscale is repeated to 3 channels, alpha
    dropped. Uses torchvision's decoder, falling back to PIL; raises :class:`DecodeError` if neither can read it."""
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for torchcodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception as e_tv:
        try:
            img = _decode_pil(data)
        except Exception as e_pil:
            raise DecodeError(f"cannot decode image ({len(data)} bytes): {e_pil or e_tv}") from None
    if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
        raise DecodeError(f"unexpected decoded image shape {tuple(img.shape)}")
    return img


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                               g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in ``scale`` and aspect ratio in ``ratio``
    (the Inception crop); falls back to a centre crop clamped to ``ratio`` after 10 tries."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, 0, height - h), _randint(g, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(img: torch.Tensor, size) -> torch.Tensor:
    return TF.resize(img, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def train_transform(img: torch.Tensor, img_size: int, g: torch.Generator, crop_min_scale: float = 0.35,
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True) -> torch.Tensor:
    """RandomResizedCrop(img_size, scale=(crop_min_scale, 1), ratio) + random horizontal flip, uint8 in/out."""
    top, left, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1], (crop_min_scale, 1.0), ratio, g)
    out = _resize(img[:, top:top + h, left:left + w], [img_size, img_size])
    if hflip and float(torch.rand((), generator=g)) < 0.5:
        out = out.flip(-1)
    return out.contiguous()


def eval_transform(img: torch.Tensor, img_size: int) -> torch.Tensor:
    """Resize the shorter side to img_size / 0.875, then centre-crop img_size x img_size (uint8 in/out)."""
    short = max(img_size, int(img_size / EVAL_CROP_FRACTION))
    h, w = img.shape[-2:]
    if h <= w:
        size = [short, max(short, int(round(w * short / h)))]
    else:
        size = [max(short, int(round(h * short / w))), short]
    img = _resize(img, size)
    top, left = (size[0] - img_size) // 2, (size[1] - img_size) // 2
    return img[:, top:top + img_size, left:left + img_size].contiguous()


def normalize(images: torch.Tensor, device=None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B,3,H,W) or (3,H,W) -> float32 normalised with ImageNet mean/std, moved to ``device`` first
    (so the 4x larger float tensor is only made there)."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    x = images.float().div_(255.0)
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return x.sub_(m).div_(s)
