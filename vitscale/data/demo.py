"""Bundled demo data built from real images that ship with installed packages (no download).

``digits``: scikit-learn's 1,797 handwritten 8x8 digits (10 classes), upscaled to 32x32 RGB PNG; 1,500 train
samples in 8 shards (shuffled once, fixed seed) and 297 held-out val samples in 2 shards (stratified split).
``photos``: random 96x96 crops (JPEG) of scikit-image's colour photos, label = source photo; 8 train shards,
2 val shards.
``nature`` and ``scenes``: multi-scale crops of 34 real photographs (``nature.py``; 23 of them come with two Debian
packages, which must be installed); ``nature`` is unlabelled and held out by photo, ``scenes`` is labelled by photo
and held out by region. Their crop size is 64 px, or N px for ``nature-N`` / ``scenes-N``.

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
from typing import Iterator, Optional

import numpy as np
from PIL import Image
import skimage.data

from vitscale.data.nature import SCENES, build_nature, build_scenes, check_photos
from vitscale.data.writer import MANIFEST, write_shards

VERSION = 1
SEED = 0
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
# what each demo set's manifest will say, known before it is built (demo:nature is unlabelled)
NUM_CLASSES = {"digits": 10, "photos": len(PHOTOS), "scenes": len(SCENES)}
SIZED = {"nature": 64, "scenes": 64}  # sets whose crop size a name suffix sets ("nature-32"), with the default


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


BUILDERS = {"digits": _build_digits, "photos": _build_photos, "nature": build_nature, "scenes": build_scenes}


def parse_name(name: str) -> tuple[str, dict]:
    """``"nature-32"`` -> ``("nature", {"size": 32})``; a set in ``SIZED`` without a suffix gets its default size."""
    base, _, suffix = name.partition("-")
    if base in SIZED:
        if not suffix:
            return base, {"size": SIZED[base]}
        if suffix.isdigit() and 8 <= int(suffix) <= 1024:
            return base, {"size": int(suffix)}
        raise ValueError(f"bad demo data set {name!r}: {base}-N takes a crop size N in 8..1024 px")
    if name not in BUILDERS:
        raise ValueError(f"unknown demo data set {name!r}: choose one of "
                         f"{', '.join(sorted([*BUILDERS, *(f'{b}-N' for b in SIZED)]))}")
    return name, {}


def num_classes(name: str) -> Optional[int]:
    """Classes a demo set's manifest will say, without building it (None: unknown name or unlabelled)."""
    try:
        return NUM_CLASSES.get(parse_name(name)[0])
    except ValueError:
        return None


def _paths(final: Path) -> dict:
    return {"train": str(final / "train" / MANIFEST), "val": str(final / "val" / MANIFEST)}


def ensure_demo_shards(name: str, cache_dir: str = "data_cache") -> dict:
    """Build the demo shards ``name`` under ``cache_dir`` unless present; return ``{train: path, val: path}``
    (manifest paths). Safe when several processes call it at once. A missing input (demo:nature's photos) is a
    one-line error before anything is written."""
    base, options = parse_name(name)
    cache = Path(cache_dir)
    canonical = f"{base}-{options['size']}" if "size" in options else base  # nature = nature-64: one cache
    final = cache / f"demo-{canonical}-v{VERSION}"
    paths = _paths(final)
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    if base in ("nature", "scenes"):
        check_photos(f"demo:{name}")  # before anything is written
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".demo-{name}-", dir=cache))
    try:
        BUILDERS[base](tmp, **options)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not all(os.path.isfile(p) for p in paths.values()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
