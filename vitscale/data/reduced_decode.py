"""A training sample's pixels for less CPU: JPEGs whose random crop is much larger than the output are decoded
at 1/2, 1/4 or 1/8 scale (libjpeg-turbo's DCT-domain scaling, through simplejpeg), then cut on the reduced pixel
grid and resized as :func:`transforms.apply_crop` does.

The crop is drawn from the header's size with the same generator draws as :func:`transforms.train_transform`, so
the flip and RandAugment seed are the ones a full decode gets, and the crop is the same one snapped to the reduced
grid: each edge moves to the nearest multiple of the scale, at most ``scale / 2`` source pixels (1 px at 1/2
scale; under ``scale`` at a bottom or right image edge that is not a multiple of it), which keeps the crop an exact
block of reduced pixels so torch's resize cuts it without resampling offsets.

Thresholds (short side of the crop over the output side): 1/2 scale from 3x, 1/4 from 6x, 1/8 from 12x, where the
output stays within PSNR 35 dB of decoding in full and resizing that snapped crop (worst measured 37.8 dB over
crops 1-1.25x the thresholds on ImageNet-sized and photo JPEGs; tests/test_reduced_decode.py). Closer to the
output, the DCT's low-pass and the resize's filter differ visibly: 33 dB for 1/2 at 2x, 32-33 dB for 1/4 at 4x
and 1/8 at 8x.

Per image, one core, decode + crop: ImageNet-sized JPEGs (500x375, 110 KB) at 24 / 64 px 0.81x / 0.89x of the
full decode's CPU, the bench's photos 0.71x / 0.82x, 300-1000 px photos at 24-112 px 0.69-0.87x (PIL's ``draft``,
used before, saved 0-18%). Entropy decoding of the whole file remains: a 1/2-scale decode of a 110 KB file costs
0.90x of the full one (3/4-7/8 scales cost more than a full decode), so at 112 px from ImageNet-sized files (21% of
crops qualify) it saves nothing measurable, and at 224 px no crop qualifies. Anything else (PNG, a rotated or CMYK
JPEG, a smaller crop, a file simplejpeg refuses, no simplejpeg) takes the full decode, which names any problem.
"""
from __future__ import annotations

from typing import Optional

import torch

from vitscale.data.transforms import (DEFAULT_MAX_PIXELS, Crop, Header, apply_crop, decode, read_header,
                                      simplejpeg, train_crop, train_transform)

# (scale divisor, smallest crop-side / output-side ratio that may use it), largest first; see the module docstring
# for the PSNR each keeps (the test fails if any of them is loosened to 2x, 4x or 8x).
SCALE_THRESHOLDS = ((8, 12.0), (4, 6.0), (2, 3.0))


def reduced_scale(crop: Crop) -> int:
    """1, 2, 4 or 8: how much smaller the JPEG may be decoded for this crop."""
    ratio = min(crop.height, crop.width) / crop.size
    return next((s for s, need in SCALE_THRESHOLDS if ratio >= need), 1)


def reduced_grid_crop(crop: Crop, scale: int, height: int, width: int) -> Crop:
    """``crop`` (of a ``height`` x ``width`` image) in the pixels of the image decoded at ``1/scale``: its edges
    rounded to the nearest reduced pixel, and kept off a last reduced row or column that covers fewer than ``scale``
    source pixels (its content stands for a narrower strip than the resize would assume)."""
    top, left = round(crop.top / scale), round(crop.left / scale)
    bottom = min(round((crop.top + crop.height) / scale), height // scale)
    right = min(round((crop.left + crop.width) / scale), width // scale)
    return crop.moved(top, left, bottom - top, right - left)


def snapped_crop(crop: Crop, scale: int, height: int, width: int) -> Crop:
    """The crop of the full-size image that the reduced decode cuts: ``reduced_grid_crop`` in source pixels."""
    r = reduced_grid_crop(crop, scale, height, width)
    return crop.moved(r.top * scale, r.left * scale, r.height * scale, r.width * scale)


def reduced_crop(data: bytes, head: Header, crop: Crop, scale: int) -> Optional[torch.Tensor]:
    """The crop of a JPEG decoded at ``1/scale`` (uint8 (3,S,S), flipped and augmented as ``apply_crop`` does),
    or None when simplejpeg is missing or cannot read it this way (the caller decodes it fully, which names the
    problem)."""
    if simplejpeg is None:
        return None
    height, width = -(-head.height // scale), -(-head.width // scale)  # libjpeg's scaled size: rounded up
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=height, min_width=width)
    except Exception:
        return None
    if arr.shape[:2] != (height, width):  # another scale than asked for: the grid would not match
        return None
    return apply_crop(torch.from_numpy(arr).permute(2, 0, 1), reduced_grid_crop(crop, scale, head.height, head.width))


def train_image(data: bytes, img_size: int, g: torch.Generator, crop_min_scale: float = 0.35, randaug: str = "",
                max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, interpolation: str = "bilinear") -> torch.Tensor:
    """``train_transform(decode(data))`` with the same draws from ``g``, decoding at reduced size where the crop
    allows (see the module docstring). Raises what :func:`transforms.decode` raises."""
    head = read_header(data, max_pixels)
    if head.format != "JPEG" or head.orientation != 1 or head.mode not in ("RGB", "L"):
        return train_transform(decode(data, max_pixels, head), img_size, g, crop_min_scale, randaug=randaug,
                               interpolation=interpolation)
    crop = train_crop(head.height, head.width, img_size, g, crop_min_scale, randaug=randaug,
                      interpolation=interpolation)
    scale = reduced_scale(crop)
    img = reduced_crop(data, head, crop, scale) if scale > 1 else None
    return img if img is not None else apply_crop(decode(data, max_pixels, head), crop)
