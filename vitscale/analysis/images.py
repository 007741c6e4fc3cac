"""Input images for analysis: files (any format PIL reads) or the photos bundled with scikit-image."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
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


def load_images(paths: Sequence[Union[str, Path]], size: Union[int, tuple[int, int]],
                samples: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, list[str]]:
    """uint8 (B, 3, H, W) images and their names. No ``paths``: scikit-image's sample photos
    (``samples``, default astronaut, coffee, chelsea)."""
    pics, names = [], []
    if paths:
        for p in paths:
            p = Path(p)
            if not p.is_file():
                raise FileNotFoundError(f"image not found: {p}")
            with Image.open(p) as im:
                pics.append(resize_center_crop(im, size))
            names.append(p.stem)
    else:
        for name in samples or DEFAULT_SAMPLES:
            arr = getattr(skimage.data, name)()
            if arr.ndim == 2:
                arr = np.stack([arr] * 3, axis=-1)
            pics.append(resize_center_crop(Image.fromarray(arr[..., :3].astype(np.uint8)), size))
            names.append(name)
    batch = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.uint8).copy()).permute(2, 0, 1) for p in pics])
    return batch, names
