"""A training sample's pixels for less CPU: JPEGs whose random crop is much larger than the output are decoded
at 1/4 or 1/8 scale (libjpeg's DCT-domain scaling, through PIL's ``draft``), then cut and resized from the
reduced image with the crop box in fractional coordinates.

The crop is drawn from the header's size with the same generator draws as :func:`transforms.train_transform`,
so the crop, flip and RandAugment seed are the ones a full decode gets. Thresholds (short side of the crop over
the output side): 1/4 scale from 6x, 1/8 from 12x, where the output stays within PSNR >= 35 dB of
decode-then-resize on real photos (measured: >= 38 dB; tests/test_reduced_decode.py), and where it saves CPU
(see DRAFT_THRESHOLDS: 1/2 scale would cost more than torchvision's full decode). Anything else (PNG, a rotated
or CMYK JPEG, a crop under 6x, a file PIL cannot read) takes the full decode. On ImageNet-sized files (500x375)
at 224 px no crop qualifies: this pays for low-resolution training (<= 64 px) or large source images.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch

from vitscale.data.transforms import (DEFAULT_MAX_PIXELS, Crop, Header, apply_crop, decode, finish_crop,
                                      our_pixel_limit, read_header, train_crop, train_transform)

# (scale divisor, smallest crop-side / output-side ratio that may use it), largest first. No 1/2: PIL's JPEG
# decoding (entropy decoding of the whole file, then its own row unpacking) at 1/2 scale costs more CPU than
# torchvision's full decode + resize (measured on 500x375 ~110 KB JPEGs, one core: 2.4-2.8 vs 2.0 ms); at 1/4 it
# costs less (1.8 vs 2.0 ms), at 1/4-1/8 of an 872x1000 photo 0.6-0.7x.
DRAFT_THRESHOLDS = ((8, 12.0), (4, 6.0))


def draft_scale(crop: Crop) -> int:
    """1, 4 or 8: how much smaller the JPEG may be decoded for this crop."""
    ratio = min(crop.height, crop.width) / crop.size
    return next((r for r, need in DRAFT_THRESHOLDS if ratio >= need), 1)


def reduced_crop(data: bytes, head: Header, crop: Crop, scale: int) -> Optional[torch.Tensor]:
    """The crop of a JPEG decoded at ``1/scale`` (uint8 (3,S,S), flipped and augmented as ``apply_crop`` does),
    or None when PIL cannot read it this way (the caller decodes it fully, which names the problem)."""
    from PIL import Image

    try:
        with our_pixel_limit(), Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            im.draft("RGB", (-(-head.width // scale), -(-head.height // scale)))
            sx, sy = im.width / head.width, im.height / head.height
            box = (crop.left * sx, crop.top * sy, (crop.left + crop.width) * sx, (crop.top + crop.height) * sy)
            arr = np.array(im.convert("RGB").resize((crop.size, crop.size), Image.BILINEAR, box=box))
    except Exception:
        return None
    return finish_crop(torch.from_numpy(arr).permute(2, 0, 1), crop)


def train_image(data: bytes, img_size: int, g: torch.Generator, crop_min_scale: float = 0.35, randaug: str = "",
                max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """``train_transform(decode(data))`` with the same draws from ``g``, decoding at reduced size where the crop
    allows (see the module docstring). Raises what :func:`transforms.decode` raises."""
    head = read_header(data, max_pixels)
    if head.format != "JPEG" or head.orientation != 1 or head.mode not in ("RGB", "L"):
        return train_transform(decode(data, max_pixels), img_size, g, crop_min_scale, randaug=randaug)
    crop = train_crop(head.height, head.width, img_size, g, crop_min_scale, randaug=randaug)
    scale = draft_scale(crop)
    img = reduced_crop(data, head, crop, scale) if scale > 1 else None
    return img if img is not None else apply_crop(decode(data, max_pixels), crop)
