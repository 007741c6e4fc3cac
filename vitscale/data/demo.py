"""Bundled demo data built from real images that ship with installed packages (no download).

``digits``: scikit-learn's 1,797 handwritten 8x8 digits (10 classes), upscaled to 32x32 RGB PNG; 1,500 train
samples in 8 shards (shuffled once, fixed seed) and 297 held-out val samples in 2 shards (stratified split).
``photos``: random 96x96 crops (JPEG) of scikit-image's colour photos, label = source photo; 8 train shards,
2 val shards.

The cache is ``<cache_dir>/demo-<name>-v1/{train,val}/``, each with a ``manifest.json``. It is built in a
temporary directory and renamed into place, so concurrent builders (several ranks) are safe: the first rename
wins, losers discard their copy, and a complete cache is reused without rebuilding.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
import skimage.data

from vitscale.data.writer import MANIFEST, write_shards

VERSION = 1
SEED = 0
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
NUM_CLASSES = {"digits": 10, "photos": len(PHOTOS)}  # what each demo set's manifest will say, known before it is built


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _build_digits(root: Path) -> None:
    import torch
    import torch.nn.functional as F
    # startup: scikit-learn adds 1.2 s (measured); only building demo:digits needs it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0))[:, None]  # (N,1,8,8), 0..255
    up = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).round().clamp(0, 255)
    up = up.to(torch.uint8)[:, 0].numpy()
    idx = np.arange(len(d.target))
    train_idx, val_idx = train_test_split(idx, test_size=297, stratify=d.target, random_state=SEED)
    train_idx = np.random.default_rng(SEED).permutation(train_idx)  # shard order shuffled once
    val_idx = np.sort(val_idx)

    def samples(ids) -> Iterator:
        for i in ids:
            g = up[i]
            yield f"digits_{i:04d}", _png(np.stack([g, g, g], axis=-1)), "png", int(d.target[i])

    names = [str(c) for c in range(10)]
    write_shards(samples(train_idx), root / "train", "train", maxcount=-(-len(train_idx) // 8), class_names=names)
    write_shards(samples(val_idx), root / "val", "val", maxcount=-(-len(val_idx) // 2), class_names=names)


def _build_photos(root: Path, n_train: int = 1000, n_val: int = 200, size: int = 96) -> None:
    photos, names = [], []
    for name in PHOTOS:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a photo that needs a download (not bundled): leave it out
            continue
        if img.ndim != 3 or img.shape[2] < 3 or min(img.shape[:2]) < size:
            continue
        photos.append(np.ascontiguousarray(img[:, :, :3]))
        names.append(name)
    if len(photos) < 2:
        raise RuntimeError("demo:photos needs at least 2 colour photos from skimage.data; found "
                           f"{len(photos)}")

    def samples(split: str, n: int, seed: int) -> Iterator:
        rng = np.random.default_rng(seed)
        for k in range(n):
            label = int(rng.integers(len(photos)))
            img = photos[label]
            i = int(rng.integers(img.shape[0] - size + 1))
            j = int(rng.integers(img.shape[1] - size + 1))
            yield f"photos_{split}_{k:05d}", _jpeg(img[i:i + size, j:j + size]), "jpg", label

    write_shards(samples("train", n_train, SEED), root / "train", "train", maxcount=-(-n_train // 8),
                 class_names=names)
    write_shards(samples("val", n_val, SEED + 1), root / "val", "val", maxcount=-(-n_val // 2),
                 class_names=names)


BUILDERS = {"digits": _build_digits, "photos": _build_photos}


def _paths(final: Path) -> dict:
    return {"train": str(final / "train" / MANIFEST), "val": str(final / "val" / MANIFEST)}


def ensure_demo_shards(name: str, cache_dir: str = "data_cache") -> dict:
    """Build the demo shards ``name`` under ``cache_dir`` unless present; return ``{train: path, val: path}``
    (manifest paths). Safe when several processes call it at once."""
    if name not in BUILDERS:
        raise ValueError(f"unknown demo data set {name!r}: choose one of {', '.join(sorted(BUILDERS))}")
    cache = Path(cache_dir)
    final = cache / f"demo-{name}-v{VERSION}"
    paths = _paths(final)
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".demo-{name}-", dir=cache))
    try:
        BUILDERS[name](tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not all(os.path.isfile(p) for p in paths.values()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
