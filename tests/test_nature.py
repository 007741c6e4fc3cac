"""demo:nature and demo:scenes, built from generated JPEGs laid out like the two Debian packages (CI needs neither).

The generated package photos are gradients: red = column / width, green = row / height, so a crop's mean colour
says where in its photo it was cut; two of them are greyscale files, as in the real packages."""
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitscale.bench.common import resolve_num_classes
from vitscale.config.load import load_config
from vitscale.data.demo import ensure_demo_shards, parse_name
from vitscale.data.nature import (APT, MATE, PLASMA, ROOT_ENV, SCENES, VAL_SCENES, VAL_STRIP, package_files,
                                  plan_crops)
from vitscale.data.shards import resolve_shards
from vitscale.errors import DataError
from conftest import DEMO, run_cli

GREY = ("Grey", "ColdRipple")


def _fake_root(root: Path) -> Path:
    for k, (name, path) in enumerate(package_files(root).items()):
        w, h = (256, 160) if name in PLASMA else (200 + 8 * k, 128)
        x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
        rgb = np.stack([x, y, np.full_like(x, 10 * k)], -1).round().astype(np.uint8)
        img = Image.fromarray(rgb[..., 0], "L") if name in GREY else Image.fromarray(rgb, "RGB")
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    return _fake_root(tmp_path_factory.mktemp("share"))


@pytest.fixture
def photos_env(photo_root, monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(photo_root))
    return photo_root


def _samples(urls):
    """(key, RGB array, label or None) of every sample, read with plain tarfile."""
    out = []
    for url in urls:
        with tarfile.open(url) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "jpg":
                cls = members.get(f"{key}.cls")
                out.append((key, np.asarray(Image.open(io.BytesIO(data))), None if cls is None else int(cls)))
    return out


def _scene(key: str) -> str:
    return key.split("_", 3)[3]


def test_nature_holds_out_whole_photos_in_rgb(photos_env, tmp_path):
    paths = ensure_demo_shards("nature-16", str(tmp_path / "a"))
    train, val = (json.loads(Path(paths[s]).read_text()) for s in ("train", "val"))
    assert (train["num_samples"], val["num_samples"], len(train["shards"]), len(val["shards"])) == (4000, 800, 8, 2)
    tr = _samples(resolve_shards(paths["train"]).urls)
    va = _samples(resolve_shards(paths["val"]).urls)
    assert all(img.shape == (16, 16, 3) and lab is None for _, img, lab in tr + va)  # unlabelled
    train_scenes, val_scenes = Counter(_scene(k) for k, _, _ in tr), Counter(_scene(k) for k, _, _ in va)
    assert set(val_scenes) == set(VAL_SCENES) and set(train_scenes) == set(SCENES) - set(VAL_SCENES)
    assert min(train_scenes.values()) > 4000 / 28 / 2  # scenes drawn uniformly
    grey = np.stack([img for k, img, _ in tr + va if _scene(k) in GREY]).astype(int)
    assert len(grey) > 100 and np.abs(grey[..., 0] - grey[..., 1]).max() <= 2  # greyscale -> R = G = B
    colour = np.stack([img for k, img, _ in tr if _scene(k) in MATE]).astype(int)
    assert np.abs(colour[..., 0] - colour[..., 1]).mean() > 20
    # a pure function of the seed: a second build is byte for byte the same
    again = ensure_demo_shards("nature-16", str(tmp_path / "b"))
    assert [s["sha256"] for s in json.loads(Path(again["train"]).read_text())["shards"]] == \
        [s["sha256"] for s in train["shards"]]


def test_scenes_holds_out_the_right_strip_of_every_photo(photos_env, tmp_path):
    paths = ensure_demo_shards("scenes-16", str(tmp_path))
    tr = _samples(resolve_shards(paths["train"]).urls)
    va = _samples(resolve_shards(paths["val"]).urls)
    assert resolve_shards(paths["val"]).num_classes == len(SCENES) == 34
    assert all(lab == SCENES.index(_scene(k)) for k, _, lab in tr + va)
    assert set(lab for _, _, lab in va) == set(range(34)) == set(lab for _, _, lab in tr)
    cut = 255 * (1 - VAL_STRIP)
    red = {split: np.array([img[..., 0].mean() for k, img, _ in rows if _scene(k) in package_files(Path("/"))])
           for split, rows in (("train", tr), ("val", va))}
    assert red["train"].max() < cut + 3 and red["val"].min() > cut - 3  # each crop inside its side of the cut
    assert red["train"].min() < 30 and red["val"].max() > 240  # and each side spans its part of the photo


def test_crops_are_multi_scale_and_inside_their_region():
    rng = np.random.default_rng(0)
    boxes = np.array(plan_crops(rng, (100, 50, 1100, 850), 64, 800, 4000))
    sides = boxes[:, 2] - boxes[:, 0]
    assert (sides == boxes[:, 3] - boxes[:, 1]).all() and sides.min() >= 64 and sides.max() <= 800
    assert boxes[:, 0].min() >= 100 and boxes[:, 1].min() >= 50 and boxes[:, 2].max() <= 1100
    assert boxes[:, 3].max() <= 850
    octave = np.log2(sides / 64)  # log-uniform: each of the 3.6 octaves equally often
    assert abs(np.median(octave) - np.log2(800 / 64) / 2) < 0.1 and (octave < 1).mean() == pytest.approx(0.27, abs=0.03)
    with pytest.raises(ValueError, match="cannot hold a 64 px crop"):
        plan_crops(rng, (0, 0, 63, 500), 64, 500, 1)


def test_missing_photos_stop_in_one_line_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "empty"))
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        ensure_demo_shards("nature", str(cache))
    msg = str(e.value)
    assert "\n" not in msg and APT in msg and "backgrounds/mate/nature/Aqua.jpg" in msg and "22 more" in msg
    assert not cache.exists()
    r = run_cli(["check-shards", "demo:scenes", "--cache-dir", str(cache)], cwd=tmp_path,
                env_extra={ROOT_ENV: str(tmp_path / "empty")})
    assert r.returncode == 2 and not cache.exists()
    assert r.stderr.count("\n") == 1 and "vitscale: error: demo:scenes needs" in r.stderr and APT in r.stderr
    # one package installed, the other not: still refused, naming a file of the missing one
    _fake_root(tmp_path / "half")
    for name in PLASMA:
        (tmp_path / "half" / "wallpapers" / name / "contents" / "images" / "2560x1600.jpg").unlink()
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "half"))
    with pytest.raises(DataError, match=r"wallpapers/BytheWater/.*\(and 10 more\)"):
        ensure_demo_shards("nature", str(cache))


def test_demo_names_and_class_counts():
    assert parse_name("nature") == ("nature", {"size": 64}) and parse_name("scenes-32") == ("scenes", {"size": 32})
    assert parse_name("digits") == ("digits", {})
    with pytest.raises(ValueError, match="nature-N takes a crop size N in 8..1024"):
        parse_name("nature-big")
    with pytest.raises(ValueError, match="choose one of digits, nature, nature-N, photos, scenes, scenes-N"):
        parse_name("natur")
    cfg = load_config(DEMO, ["data.train_shards=demo:scenes-32"])
    assert resolve_num_classes(cfg) == (34, "the demo data")
    assert resolve_num_classes(load_config(DEMO)) == (10, "the demo data")
