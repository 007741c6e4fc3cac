"""What ``vitscale bench --what data`` reads besides its default photos: ImageNet-sized JPEGs, and webdataset's tar
reader to compare with vitscale's own (data/tarstream.py) in the same loader."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from vitscale.data import tario
from vitscale.data.tarstream import tar_members


def imagenet_like(root: Path, n: int, seed: int) -> list[Path]:
    """JPEGs the size of an average ImageNet training image: 500x375 (one in four 375x500), ~110 KB. The skimage
    photos are upscaled 1.6x (or more, to a 520 px short side) and cropped; upscaling leaves them smoother than a
    camera's photo (half the bytes at the same quality), so Gaussian noise (sigma 10) stands in for sensor
    texture, saved at quality 95: 96-114 KB."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    photos = {}
    for name in names:
        try:
            img = Image.fromarray(np.asarray(getattr(skimage.data, name)())[:, :, :3])
        except Exception:  # a photo that would need a download
            continue
        scale = max(1.6, 520 / min(img.size))  # every photo can give a 500 px side
        photos[name] = np.asarray(img.resize((int(img.width * scale), int(img.height * scale)), Image.BICUBIC))
    files = []
    for i in range(n):
        name = sorted(photos)[i % len(photos)]
        img = photos[name]
        h, w = (500, 375) if i % 4 == 3 else (375, 500)
        top, left = int(rng.integers(img.shape[0] - h + 1)), int(rng.integers(img.shape[1] - w + 1))
        noisy = img[top:top + h, left:left + w].astype(np.float32) + rng.normal(0, 10, (h, w, 3))
        path = root / name / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=95)
        files.append(path)
    return files


class _WdsMember:
    """A member as webdataset's tar iterator hands it over (already read), shaped like tarstream's Member."""

    __slots__ = ("name", "data")

    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data

    def read(self) -> bytes:
        return self.data


def wds_tar_members(stream):
    """The members of a tar stream through webdataset's own reader (``tariterators.tar_file_iterator``, Python's
    ``tarfile`` in stream mode) instead of vitscale's tarstream: what the bench compares."""
    from webdataset.tariterators import tar_file_iterator

    for item in tar_file_iterator(stream, skip_meta=None):
        yield _WdsMember(item["fname"], item["data"])


@contextlib.contextmanager
def webdataset_tar_reader() -> Iterator[None]:
    """Inside the block, the shard reader (data/tario.py) reads tars with webdataset's reader: DataLoader workers
    forked inside it keep it."""
    ours = tario.tar_members
    tario.tar_members = wds_tar_members
    try:
        yield
    finally:
        tario.tar_members = ours


def tar_costs(urls: list[str], passes: int = 3) -> dict[str, float]:
    """Single-core microseconds per sample to read the shards' members (all bytes) with each tar reader."""
    best = {"tar_ours_us": float("inf"), "tar_wds_us": float("inf")}
    samples = 0
    for _ in range(passes):
        for key, members in (("tar_ours_us", tar_members), ("tar_wds_us", wds_tar_members)):
            n, t0 = 0, time.process_time()
            for url in urls:
                with open(url, "rb") as f:
                    for m in members(f):
                        m.read()
                        n += 1
            best[key] = min(best[key], time.process_time() - t0)
            samples = n // 2  # an image and a label member per sample
    return {k: 1e6 * v / samples for k, v in best.items()}
