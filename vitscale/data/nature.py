"""Real photographs under free licences, as demo data: ``demo:nature`` and ``demo:scenes`` (built by ``demo.py``).

34 scenes: 23 photographs from two Debian packages (about 135 MB, no dependencies; not bundled with any Python
package, so the builder asks for them) plus 9 of scikit-image's and scikit-learn's 2 bundled photos.

* ``mate-backgrounds`` (GPL-2+): the 12 files of ``/usr/share/backgrounds/mate/nature/`` (1280-2560 px).
* ``plasma-workspace-wallpapers`` (LGPL-3): the 11 wallpapers that are photographs, each
  ``/usr/share/wallpapers/<Name>/contents/images/2560x1600.jpg``; the others (Autumn, Elarun, FlyingKonqui and the
  screenshot-only ones) are artwork, picked out by eye. Grey and ColdRipple are greyscale.
* scikit-image (``skimage.data``): astronaut (NASA, public domain), coffee, chelsea, camera (CC0), rocket (SpaceX,
  public domain), coins (Brooklyn Museum, no known restrictions), grass, gravel, brick (CC0 textures).
* scikit-learn (``load_sample_images``): china, flower (CC BY 2.0, Flickr users danielbuechele and vultilion).

The packages' root is ``/usr/share`` or ``$VITSCALE_PHOTO_ROOT`` (same layout below it: ``backgrounds/mate/nature/``,
``wallpapers/<Name>/contents/images/``), so tests build from generated JPEGs in a temporary folder.

A crop is a random square of side ``size * 2**u`` (``u`` uniform, up to the photo's largest allowed side), resized
to ``size`` with PIL's antialiasing filter, so one photo gives crops at many scales; greyscale becomes RGB by
repeating the channel. Everything is a pure function of the seed: crops are planned from the photos' sizes first,
then rendered one photo at a time (one 2560x1600 photo in memory at once).
"""
from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image
import skimage.data

from vitscale.errors import DataError
from vitscale.data.writer import write_shards

ROOT_ENV = "VITSCALE_PHOTO_ROOT"
DEFAULT_ROOT = "/usr/share"
APT = "apt-get install -y mate-backgrounds plasma-workspace-wallpapers"
MATE = ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")
PLASMA = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
          "OneStandsOut", "Path", "summer_1am")
SKIMAGE = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "grass", "gravel", "brick")
SKLEARN = ("china", "flower")
SCENES = (*MATE, *PLASMA, *SKIMAGE, *SKLEARN)
# demo:nature's held-out scenes: two per package, one bundled photo each; no scene is on both sides
VAL_SCENES = ("LadyBird", "Storm", "Path", "Grey", "coffee", "china")
SEED = 0
# demo:scenes holds out this right-hand fraction of every photo's width
VAL_STRIP = 0.25


def photo_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def package_files(root: Path) -> dict[str, Path]:
    """Scene name -> file, for the photographs of the two Debian packages under ``root``."""
    out = {n: root / "backgrounds" / "mate" / "nature" / f"{n}.jpg" for n in MATE}
    out.update({n: root / "wallpapers" / n / "contents" / "images" / "2560x1600.jpg" for n in PLASMA})
    return out


def check_photos(source: str, root: Optional[Path] = None) -> dict[str, Path]:
    """The package photos, or a one-line :class:`DataError` naming the first missing file and the install command."""
    root = photo_root() if root is None else root
    files = package_files(root)
    missing = [p for p in files.values() if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{source} needs the photos of two Debian packages: {missing[0]} is missing{more}; "
                        f"install them with `sudo {APT}`, or point {ROOT_ENV} at a folder of the same layout "
                        f"(now {root})")
    return files


@functools.lru_cache(maxsize=None)  # a build asks for each photo's size, then its pixels
def _bundled(name: str) -> np.ndarray:
    if name in SKLEARN:
        # startup: scikit-learn adds 1.2 s (measured); only building these demo sets needs it
        from sklearn.datasets import load_sample_images
        data = load_sample_images()
        return data.images[[Path(f).stem for f in data.filenames].index(name)]
    return np.asarray(getattr(skimage.data, name)())


def _rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB")  # greyscale repeats its channel; loads the pixels (a copy even when RGB already)


class Photos:
    """Scene name -> PIL image, opened lazily (only a JPEG's header until pixels are needed)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def size(self, name: str) -> tuple[int, int]:
        if name in self.files:
            with Image.open(self.files[name]) as im:
                return im.size
        h, w = _bundled(name).shape[:2]
        return w, h

    def open(self, name: str) -> Image.Image:
        if name in self.files:
            with Image.open(self.files[name]) as im:
                return _rgb(im)  # converting loads the pixels, so the file can close
        return _rgb(Image.fromarray(_bundled(name)))


def plan_crops(rng: np.random.Generator, region: tuple[int, int, int, int], size: int, max_side: int,
               n: int) -> list[tuple[int, int, int, int]]:
    """``n`` square boxes ``(left, top, right, bottom)`` inside ``region``, side ``size * 2**u`` with ``u`` uniform in
    ``[0, log2(max_side / size)]`` (log-uniform scale: every octave as likely as the next)."""
    x0, y0, x1, y1 = region
    max_side = min(max_side, x1 - x0, y1 - y0)
    if max_side < size:
        raise ValueError(f"a region of {x1 - x0}x{y1 - y0} px cannot hold a {size} px crop")
    octaves = np.log2(max_side / size)
    boxes = []
    for _ in range(n):
        side = min(max_side, int(round(size * 2.0 ** rng.uniform(0.0, octaves))))
        left = x0 + int(rng.integers(x1 - x0 - side + 1))
        top = y0 + int(rng.integers(y1 - y0 - side + 1))
        boxes.append((left, top, left + side, top + side))
    return boxes


def render(photos: Photos, plan: list[tuple[str, tuple[int, int, int, int]]], size: int) -> list[bytes]:
    """JPEG bytes of each planned ``(scene, box)`` crop resized to ``size``, in plan order, one photo open at a time."""
    out: list[Optional[bytes]] = [None] * len(plan)
    for name in dict.fromkeys(s for s, _ in plan):
        img = photos.open(name)
        for k, (s, box) in enumerate(plan):
            if s == name:
                crop = img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)  # box-reduce first: 3x faster, same look
                buf = io.BytesIO()
                crop.save(buf, format="JPEG", quality=90)
                out[k] = buf.getvalue()
        del img
    return out  # type: ignore[return-value]


def _write(split_plans: dict[str, list], photos: Photos, size: int, root: Path, label: Callable[[str], Optional[int]],
           class_names: Optional[list[str]], source: str) -> None:
    shards = {"train": 8, "val": 2}
    for split, plan in split_plans.items():
        data = render(photos, plan, size)

        def samples(plan=plan, data=data) -> Iterator:
            for k, ((scene, _), jpg) in enumerate(zip(plan, data)):
                yield f"{source}_{split}_{k:05d}_{scene}", jpg, "jpg", label(scene)

        write_shards(samples(), root / split, split, maxcount=-(-len(plan) // shards[split]),
                     class_names=class_names)


def build_nature(out: Path, size: int = 64, n_train: int = 4000, n_val: int = 800) -> None:
    """``demo:nature``: unlabelled multi-scale crops for self-supervised pretraining; train and val crops come from
    different scenes (``VAL_SCENES``). Scenes are drawn uniformly, so a small photo is seen as often as a large one."""
    photos = Photos(check_photos("demo:nature"))
    rng = np.random.default_rng(SEED)
    split_plans = {}
    for split, n in (("train", n_train), ("val", n_val)):
        scenes = [s for s in SCENES if (s in VAL_SCENES) == (split == "val")]
        sizes = {s: photos.size(s) for s in scenes}
        picks = rng.integers(len(scenes), size=n)
        split_plans[split] = []
        for i in picks:
            w, h = sizes[scenes[i]]
            box = plan_crops(rng, (0, 0, w, h), size, min(w, h), 1)[0]
            split_plans[split].append((scenes[i], box))
    _write(split_plans, photos, size, out, lambda s: None, None, "nature")


def build_scenes(out: Path, size: int = 64, n_train: int = 4000, n_val: int = 800) -> None:
    """``demo:scenes``: which-scene classification (label = scene, 34 classes). Every scene is on both sides, so the
    held-out crops come from a part of each photo no training crop touches: its right-hand ``VAL_STRIP`` of the width.
    Crop sides go up to the strip's width on both sides, so train and val see the same scales."""
    photos = Photos(check_photos("demo:scenes"))
    rng = np.random.default_rng(SEED + 1)
    sizes = {s: photos.size(s) for s in SCENES}
    split_plans: dict[str, list] = {"train": [], "val": []}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in rng.integers(len(SCENES), size=n):
            w, h = sizes[SCENES[i]]
            cut = int(round(w * (1 - VAL_STRIP)))
            region = (0, 0, cut, h) if split == "train" else (cut, 0, w, h)
            box = plan_crops(rng, region, size, min(h, w - cut), 1)[0]
            split_plans[split].append((SCENES[i], box))
    _write(split_plans, photos, size, out, SCENES.index, list(SCENES), "scenes")
