"""Input images for analysis: files (any format PIL reads) or the photos bundled with scikit-image."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
import skimage.data

DEFAULT_SAMPLES = ("astronaut", "coffee", "chelsea")


def resize_center_crop(img, size: Union[int, tuple[int, int]]):
    """PIL image -> RGB PIL image: shorter side resized to fit, then centre-cropped to ``size`` (h, w)."""
    h, w = (size, size) if isinstance(size, int) else size
    img = img.convert("RGB")
    scale = max(h / img.height, w / img.width)
    new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    img = img.resize(new, Image.BICUBIC)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    return img.crop((left, top, left + w, top + h))


def open_images(paths: Sequence[Union[str, Path]]) -> tuple[list, list[str]]:
    """Decoded, upright RGB PIL images and their names (file stems), at full size. Each file is decoded here, so a
    missing, unreadable or non-image file is a one-line error naming it before any model is loaded. EXIF
    orientation is applied (as training's decoder does, ``data/transforms.py``): a phone's portrait photo stored
    sideways is analysed upright."""
    pics, names = [], []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
        try:
            with Image.open(p) as im:
                pics.append(ImageOps.exif_transpose(im).convert("RGB"))
        except UnidentifiedImageError:
            raise ValueError(f"{p} is not an image file PIL can read") from None
        except (OSError, SyntaxError) as e:  # truncated or corrupt data (PIL raises SyntaxError for some formats)
            raise ValueError(f"image {p} cannot be decoded: {e}") from None
        names.append(p.stem)
    return pics, names


def sample_images(samples: Optional[Sequence[str]] = None) -> tuple[list, list[str]]:
    """scikit-image's sample photos (``samples``, default astronaut, coffee, chelsea) as RGB PIL images."""
    pics, names = [], []
    for name in samples or DEFAULT_SAMPLES:
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        pics.append(Image.fromarray(arr[..., :3].astype(np.uint8)))
        names.append(name)
    return pics, names


def to_batch(pics: Sequence, size: Union[int, tuple[int, int]]) -> torch.Tensor:
    """PIL images -> uint8 (B, 3, H, W), each resized and centre-cropped to ``size``."""
    return torch.stack([torch.from_numpy(np.asarray(resize_center_crop(p, size), dtype=np.uint8).copy())
                        .permute(2, 0, 1) for p in pics])


def load_images(paths: Sequence[Union[str, Path]], size: Union[int, tuple[int, int]],
                samples: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, list[str]]:
    """uint8 (B, 3, H, W) images and their names. No ``paths``: scikit-image's sample photos
    (``samples``, default astronaut, coffee, chelsea)."""
    pics, names = open_images(paths) if paths else sample_images(samples)
    return to_batch(pics, size), names
