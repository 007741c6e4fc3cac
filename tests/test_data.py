"""Data package: shard writer/manifest, demo shards, transforms, and the exactly-resumable streaming loader.

Real images throughout (scikit-learn digits). The whole file runs in well under a minute on 2 CPU cores.
"""
import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PicklePayload
from vitscale.data.demo import ensure_demo_shards
from vitscale.data.order import Cut, Order, block_shards
from vitscale.data.evaluation import build_eval_loader
from vitscale.data.pipeline import build_train_loader
from vitscale.data.shards import resolve_shards
from vitscale.data.writer import write_shards
from vitscale.data.transforms import DecodeError, DeferredJpeg, decode, eval_transform, materialize, train_transform
from vitscale.pixels import IMAGENET_MEAN, IMAGENET_STD, normalize

ROOT = Path(__file__).resolve().parents[1]


# ----- helpers -------------------------------------------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits_png():
    """(key, png bytes, label) for the first 200 real digits, 8x8 grayscale scaled up to 24x24."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for i in range(200):
        g = (d.images[i] * 255 / 16).astype(np.uint8).repeat(3, 0).repeat(3, 1)
        out.append((f"d{i:04d}", _png(g), int(d.target[i])))
    return out


@pytest.fixture(scope="module")
def demo(data_cache):
    train = resolve_shards("demo:digits", str(data_cache))
    val = resolve_shards("demo:digits:val", str(data_cache))
    return train, val


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["label"], y["label"])
        assert x["stream"] == y["stream"]


def _epoch0_keys(loader, num_workers):
    """Keys of every logical worker's first epoch (batch_size 1: a batch's position is its sample's)."""
    keys, done = [], set()
    for batch in loader:
        s = batch["stream"]
        if s["epoch"] == 0:
            keys += batch["key"]
        else:
            done.add(s["worker"])
            if len(done) == num_workers:
                return keys


# ----- shards --------------------------------------------------------------------------------------------------
def test_write_shards_round_trip_and_resolve(tmp_path, digits_png):
    samples = [(k, b, "png", None if i == 3 else lab) for i, (k, b, lab) in enumerate(digits_png[:25])]
    m = write_shards(iter(samples), tmp_path / "s", prefix="train", maxcount=10)
    out = tmp_path / "s"
    assert [s["name"] for s in m["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["count"] for s in m["shards"]] == [10, 10, 5] and m["num_samples"] == 25
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["num_classes"] == max(lab for _, _, lab in digits_png[:25]) + 1
    for s in on_disk["shards"]:
        data = (out / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    assert not [p for p in os.listdir(out) if "tmp" in p]
    with tarfile.open(out / "train-000000.tar") as t:  # a real POSIX tar
        names = t.getnames()
        assert t.extractfile("d0000.cls").read() == str(digits_png[0][2]).encode()
        assert t.extractfile("d0000.png").read() == digits_png[0][1]
    assert names[:2] == ["d0000.png", "d0000.cls"] and "d0003.cls" not in names and "d0003.png" in names

    by_manifest = resolve_shards(str(out / "manifest.json"))
    by_dir = resolve_shards(str(out))
    by_brace = resolve_shards(str(out / "train-{000000..000002}.tar"))
    (tmp_path / "list.txt").write_text("# shards\ns/train-000000.tar\n\ns/train-000001.tar\n")
    by_list = resolve_shards(str(tmp_path / "list.txt"))
    assert by_manifest.urls == by_dir.urls == by_brace.urls and len(by_manifest.urls) == 3
    assert by_manifest.num_samples == by_brace.num_samples == 25 and by_list.num_samples == 20
    assert by_list.urls == by_manifest.urls[:2]
    assert resolve_shards("pipe:cat /x/a-{0..1}.tar").urls == ["pipe:cat /x/a-0.tar", "pipe:cat /x/a-1.tar"]
    with pytest.raises(FileNotFoundError, match="train-000003.tar"):
        resolve_shards(str(out / "train-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        resolve_shards(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="invalid sample key"):
        write_shards([("a.b", digits_png[0][1], "png", 1)], tmp_path / "bad")


def test_demo_digits_builds_once_and_splits(demo, data_cache):
    train, val = demo
    assert (train.num_samples, val.num_samples) == (1500, 297)
    assert (len(train.urls), len(val.urls)) == (8, 2)
    assert train.num_classes == 10 and train.class_names == [str(i) for i in range(10)]
    mtimes = [os.stat(u).st_mtime_ns for u in train.urls]
    paths = ensure_demo_shards("digits", str(data_cache))  # cached: no rebuild
    assert [os.stat(u).st_mtime_ns for u in train.urls] == mtimes and Path(paths["val"]).is_file()
    seen = {}
    for urls in (train.urls, val.urls):
        for b in build_eval_loader(urls, batch_size=128, img_size=32, rank=0, world_size=1):
            assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 32, 32)
            for k, lab in zip(b["key"], b["label"].tolist()):
                assert k not in seen
                seen[k] = lab
    assert len(seen) == 1797 and set(seen.values()) == set(range(10))
    val_keys = set(_keys(val.urls))
    val_labels = np.bincount([seen[k] for k in val_keys], minlength=10)
    assert val_labels.min() >= 25  # stratified: ~30 per class


def _keys(urls):
    return [k for b in build_eval_loader(urls, batch_size=512, img_size=32, rank=0, world_size=1) for k in b["key"]]


def test_demo_concurrent_build_is_atomic(tmp_path):
    code = ("import sys, json; from vitscale.data.demo import ensure_demo_shards; "
            "print(json.dumps(ensure_demo_shards('digits', sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    assert sorted(os.listdir(tmp_path)) == ["demo-digits-v1"]  # losers' temp dirs are gone
    assert resolve_shards("demo:digits", str(tmp_path)).num_samples == 1500


# ----- transforms ----------------------------------------------------------------------------------------------
def test_transforms_are_seeded_uint8_and_decode_falls_back(digits_png):
    img = decode(digits_png[0][1])
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 24)  # grayscale PNG -> 3 channels
    a = train_transform(img, 16, torch.Generator().manual_seed(1))
    b = train_transform(img, 16, torch.Generator().manual_seed(1))
    outs = {train_transform(img, 16, torch.Generator().manual_seed(s)).numpy().tobytes() for s in range(8)}
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == (3, 16, 16) and len(outs) > 4
    e = eval_transform(torch.zeros(3, 40, 80, dtype=torch.uint8), 32)
    assert e.shape == (3, 32, 32) and e.dtype == torch.uint8
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((5, 7, 3), 200, np.uint8)).save(buf, format="BMP")  # PIL fallback path
    assert decode(buf.getvalue()).shape == (3, 5, 7)
    with pytest.raises(DecodeError):
        decode(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    x = normalize(torch.full((2, 3, 4, 4), 124, dtype=torch.uint8))
    assert x.dtype == torch.float32 and abs(float(x[0, 0].mean())) < 0.02


@pytest.mark.parametrize("kind", ["420", "444", "progressive", "gray"])
def test_jpeg_decoding_is_torchvisions_pixel_for_pixel_with_or_without_simplejpeg(kind, monkeypatch):
    """decode() takes JPEGs through simplejpeg (less CPU) and, without it, torchvision: the same libjpeg-turbo
    settings, so the pixels are identical to torchvision's decoder either way, on a real photo."""
    import skimage.data
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    from vitscale.data import transforms

    img = Image.fromarray(skimage.data.camera() if kind == "gray" else skimage.data.chelsea())
    kw = {"420": {}, "444": {"subsampling": 0}, "progressive": {"progressive": True}, "gray": {}}[kind]
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    data = buf.getvalue()
    want = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    assert transforms.simplejpeg is not None  # a dependency: the fast path is what this test checks
    assert torch.equal(decode(data), want)
    monkeypatch.setattr(transforms, "simplejpeg", None)
    assert torch.equal(decode(data), want)
    with pytest.raises(DecodeError):  # what neither decoder reads is still refused with one line
        decode(data[:len(data) // 3])


def test_normalize_is_the_imagenet_formula():
    """The fused normalisation gives (x / 255 - mean) / std per channel, to float32 rounding."""
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    want = (x.double() / 255 - mean.double()) / std.double()
    got = normalize(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert float((got.double() - want).abs().max()) < 1e-5


def test_device_decode_gives_the_worker_images(tmp_path, data_cache):
    """data.decode_on=device: workers only read JPEG headers and draw the crop; the batch decoded and cropped on
    the device (here the CPU) is the batch the workers would have made, pixel for pixel, and the stream's
    positions are the same. A JPEG with a good header and a broken body is replaced within its batch and
    counted, not fatal."""
    photos = resolve_shards("demo:photos", str(data_cache))
    kw = dict(batch_size=8, img_size=32, seed=5, rank=0, world_size=1, num_workers=1, crop_min_scale=0.4)
    # (pixel for pixel against the worker's full decode: its reduced-size decoding is within 35 dB, not equal)
    worker, device = (_take(build_train_loader(photos.urls, **kw, decode_on=on, reduced_decode=False), 3)
                      for on in ("worker", "device"))
    for a, b in zip(worker, device):
        assert isinstance(b["image"], list) and b["key"] == a["key"] and b["stream"] == a["stream"]
        images, bad = materialize(b["image"], "cpu")
        assert bad == 0 and torch.equal(images, a["image"])
    # a JPEG whose data is cut after its header: the batched decode fails, the one-by-one fallback finds it
    jpegs = [x for x in device[0]["image"] if isinstance(x, DeferredJpeg)]
    broken = DeferredJpeg(jpegs[0].data[:len(jpegs[0].data) // 3].clone(), jpegs[0].crop)
    with pytest.warns(UserWarning, match="undecodable JPEG"):
        images, bad = materialize([broken, *jpegs[1:]], "cpu")
    assert bad == 1 and images.shape == (8, 3, 32, 32) and torch.equal(images[0], images[1])
    with pytest.raises(DecodeError), pytest.warns(UserWarning):
        materialize([broken], "cpu")


# ----- the training stream -------------------------------------------------------------------------------------
def test_every_train_sample_once_per_epoch_two_ranks_two_workers(demo):
    train, _ = demo
    keys = []
    for rank in (0, 1):
        loader = build_train_loader(train.urls, batch_size=1, img_size=16, seed=3, rank=rank, world_size=2,
                                    num_workers=2)
        keys += _epoch0_keys(loader, 2)
    assert len(keys) == 1500 and len(set(keys)) == 1500
    assert set(keys) == set(_keys(train.urls))


def test_stream_is_shuffled_per_epoch_and_leaves_global_rng_alone(demo):
    train, _ = demo
    torch.manual_seed(123)
    before = torch.get_rng_state()
    loader = build_train_loader(train.urls, batch_size=1500, img_size=16, seed=0, rank=0, world_size=1,
                                num_workers=0)
    e0, e1 = _take(loader, 2)
    assert torch.equal(torch.get_rng_state(), before)
    assert sorted(e0["key"]) == sorted(e1["key"]) and e0["key"] != e1["key"]
    assert e0["stream"]["epoch"] == 0 and e1["stream"]["epoch"] == 1
    fixed = build_train_loader(train.urls, batch_size=1500, img_size=16, seed=0, rank=0, world_size=1,
                               num_workers=0, shuffle=False)
    assert next(iter(fixed))["key"] == _keys(train.urls)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume(demo, num_workers):
    train, _ = demo
    kw = dict(batch_size=32, img_size=24, seed=7, rank=0, world_size=1, num_workers=num_workers)
    k, m = 49, 5  # crosses shard and epoch boundaries; odd k exercises the worker round-robin remap
    full = _take(build_train_loader(train.urls, **kw), k + m)
    first = build_train_loader(train.urls, **kw)
    head = _take(first, k)
    _same_batches(head, full[:k])
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches"] == k and max(w["epoch"] for w in state["workers"]) == 1
    resumed = build_train_loader(train.urls, **kw, state=state)
    _same_batches(_take(resumed, m), full[k:])
    assert resumed.state_dict()["batches"] == k + m


def test_resume_skips_to_the_recorded_block(tmp_path, demo):
    """Resume must not replay the epoch: the block of shards already consumed is never read again (here:
    destroyed)."""
    train, _ = demo
    urls = []
    for u in train.urls:
        dst = tmp_path / Path(u).name
        dst.write_bytes(Path(u).read_bytes())
        urls.append(str(dst))
    kw = dict(batch_size=32, img_size=16, seed=5, rank=0, world_size=1, num_workers=0, shards_in_flight=2)
    full = _take(build_train_loader(urls, **kw), 17)
    first = build_train_loader(urls, **kw)
    _take(first, 13)  # 416 samples: past block 0 (2 shards, ~375 samples)
    state = first.state_dict()
    assert state["workers"][0]["epoch"] == 0 and state["workers"][0]["item"] == 1
    order = Order(seed=5, num_shards=8, shuffle=True, shards_in_flight=2, shuffle_buffer=1000)
    for i in block_shards(order, 0, Cut(2), 0):
        Path(urls[i]).write_bytes(b"not a tar any more" * 100)
    resumed = _take(build_train_loader(urls, **kw, state=state), 4)
    _same_batches(resumed, full[13:])
    assert resumed[-1]["stream"]["skipped"] == 0


def _bad_set(tmp_path, digits_png, corrupt=(), cuts=None):
    """200 digits in 4 shards of 50; ``corrupt`` sample indices get unreadable image bytes; ``cuts`` maps a shard
    index to (member name, where): the file is cut at that member's header ("header") or inside its data."""
    out = tmp_path / "bad"
    samples = [(k, b"\xff\xd8\xffnot really a jpeg" if i in corrupt else b, "png", lab)
               for i, (k, b, lab) in enumerate(digits_png)]
    m = write_shards(samples, out, maxcount=50)
    urls = [str(out / s["name"]) for s in m["shards"]]
    for shard, (member, where) in (cuts or {}).items():
        with tarfile.open(urls[shard]) as t:
            info = t.getmember(member)
        cut = info.offset if where == "header" else info.offset_data + 10
        data = Path(urls[shard]).read_bytes()
        Path(urls[shard]).write_bytes(data[:cut])
    return urls


def test_corrupt_image_and_truncated_tar_are_skipped_and_counted(tmp_path, digits_png, caplog):
    urls = _bad_set(tmp_path, digits_png, corrupt={60},
                    cuts={2: ("d0110.png", "header"), 3: ("d0160.png", "data")})
    with caplog.at_level(logging.WARNING, logger="vitscale.data"):
        loader = build_train_loader(urls, batch_size=1, img_size=16, seed=0, rank=0, world_size=1, num_workers=0,
                                    shuffle=False, max_bad_fraction=0.05)
        keys = _epoch0_keys(loader, 1)
    # the sample being read when the damage shows may be incomplete, so it goes too: at a header cut that is the
    # last one read (d0109: its members might go on), inside a member the one it belongs to (d0160)
    expected = [f"d{i:04d}" for i in [*range(60), *range(61, 109), *range(150, 160)]]
    assert keys == expected
    last = loader.state_dict()["workers"][0]
    assert last["skipped"] == 3 and last["seen"] == len(keys) + 3 + 1  # + the first sample of epoch 1
    assert last["bad_shards"] == 2 and loader.skipped() == (1, 2)  # 1 corrupt image, 2 truncated shards
    assert "d0060" in caplog.text and "train-000002.tar" in caplog.text and "train-000003.tar" in caplog.text
    # resuming in the middle of a damaged shard counts its damage once, as the uninterrupted stream does
    kw = dict(batch_size=1, img_size=16, seed=0, rank=0, world_size=1, num_workers=0, shuffle=False,
              max_bad_fraction=0.05)
    full = _take(build_train_loader(urls, **kw), 125)
    part = build_train_loader(urls, **kw)
    _take(part, 112)
    _same_batches(_take(build_train_loader(urls, **kw, state=part.state_dict()), 13), full[112:])


def test_a_sample_key_over_the_bound_is_a_counted_bad_shard_in_training(tmp_path, digits_png, caplog):
    urls = _bad_set(tmp_path, digits_png)
    with tarfile.open(urls[2]) as t:  # shard 2 (d0100..d0149): d0110's key becomes 5000 characters
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(urls[2], "w", format=tarfile.GNU_FORMAT) as t:
        for m, data in members:
            m.name = m.name.replace("d0110", "d0110" + "k" * 5000)
            t.addfile(m, io.BytesIO(data))
    with caplog.at_level(logging.WARNING, logger="vitscale.data"):
        loader = build_train_loader(urls, batch_size=1, img_size=16, seed=0, rank=0, world_size=1, num_workers=0,
                                    shuffle=False, max_bad_fraction=0.05)
        keys = _epoch0_keys(loader, 1)
    # the rest of shard 2 is skipped (one counted bad shard); d0109 is whole (the next member has another key)
    assert keys == [f"d{i:04d}" for i in [*range(110), *range(150, 200)]]
    assert loader.skipped() == (0, 1)
    assert "longer than 4096 characters" in caplog.text and max(map(len, caplog.messages)) < 400


def test_too_many_bad_samples_is_an_error(tmp_path, digits_png):
    urls = _bad_set(tmp_path, digits_png, corrupt=set(range(0, 200, 20)))  # 5%
    loader = build_train_loader(urls, batch_size=8, img_size=16, seed=0, rank=0, world_size=1, num_workers=0)
    with pytest.raises(RuntimeError, match="too many bad samples"):
        _take(loader, 40)


def test_pickle_members_are_never_unpickled(tmp_path, digits_png):
    target = tmp_path / "pwned"
    payload = pickle.dumps(PicklePayload(str(target)))
    pickle.loads(payload).close()  # the payload is live ...
    assert target.exists()
    target.unlink()
    shard = tmp_path / "evil-000000.tar"
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as t:
        for k, png, lab in digits_png[:4]:
            for name, data in ((f"{k}.png", png), (f"{k}.cls", str(lab).encode()), (f"{k}.pyd", payload),
                               (f"{k}.pickle", payload), (f"{k}.pth", payload)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    for num_workers in (0, 1):
        b = next(iter(build_train_loader([str(shard)], batch_size=4, img_size=16, seed=0, rank=0, world_size=1,
                                         num_workers=num_workers)))
        assert sorted(b["key"]) == [k for k, _, _ in digits_png[:4]] and b["stream"]["skipped"] == 0
    assert sorted(next(iter(build_eval_loader([str(shard)], batch_size=8, img_size=16, rank=0,
                                              world_size=1)))["key"]) == [k for k, _, _ in digits_png[:4]]
    assert not target.exists()  # ... and the loader never ran it


def test_fewer_shards_than_readers_is_a_clear_error(demo):
    train, _ = demo
    with pytest.raises(ValueError, match=r"^8 shards cannot feed 3 rank\(s\) x 3 worker\(s\) = 9 readers"):
        build_train_loader(train.urls, batch_size=4, img_size=16, seed=0, rank=0, world_size=3, num_workers=3)
    build_train_loader(train.urls, batch_size=4, img_size=16, seed=0, rank=0, world_size=4, num_workers=2)


# ----- evaluation ----------------------------------------------------------------------------------------------
def test_eval_loader_covers_val_once_across_ranks(demo):
    _, val = demo
    keys, labels = [], []
    for rank, nw in ((0, 0), (1, 2)):
        for b in build_eval_loader(val.urls, batch_size=40, img_size=32, rank=rank, world_size=2, num_workers=nw):
            assert b["image"].shape[1:] == (3, 32, 32) and len(b["key"]) <= 40
            keys += b["key"]
            labels += b["label"].tolist()
    assert len(keys) == 297 and set(keys) == set(_keys(val.urls))
    assert set(labels) == set(range(10))


# ----- make-shards ---------------------------------------------------------------------------------------------
def _image_folder(root: Path, digits_png, n=30):
    from PIL import Image

    for i, (k, png, lab) in enumerate(digits_png[:n]):
        d = root / f"class_{lab}"
        d.mkdir(parents=True, exist_ok=True)
        if i == 5:  # another format: re-encoded as PNG
            Image.open(io.BytesIO(png)).save(d / f"{k}.bmp")
        else:
            (d / f"{k}.png").write_bytes(png)
    (root / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_make_shards_from_folder_and_csv(tmp_path, digits_png):
    from vitscale.data.make_shards import make_shards

    src = _image_folder(tmp_path / "src", digits_png)
    m = make_shards(src, tmp_path / "out", maxcount=8, workers=2)
    assert m["num_samples"] == 30 and [s["count"] for s in m["shards"]] == [8, 8, 8, 6]
    assert m["skipped"] == [str(src / "class_0" / "broken.jpg")]
    assert "broken.jpg" in (tmp_path / "out" / "skipped.txt").read_text()
    assert m["class_names"] == sorted({f"class_{lab}" for _, _, lab in digits_png[:30]})
    batch = next(iter(build_eval_loader(resolve_shards(str(tmp_path / "out")).urls, batch_size=64, img_size=16,
                                        rank=0, world_size=1)))
    assert len(batch["key"]) == 30
    assert sorted(batch["label"].tolist()) == sorted(m["class_names"].index(f"class_{lab}")
                                                     for _, _, lab in digits_png[:30])
    with pytest.raises(FileExistsError, match="overwrite"):
        make_shards(src, tmp_path / "out", maxcount=8, workers=1)
    assert make_shards(src, tmp_path / "out", maxcount=100, workers=1, overwrite=True)["num_samples"] == 30

    rows = ["path,label"] + [f"src/class_{lab}/{k}.png,{lab}" for k, _, lab in digits_png[:12] if k != "d0005"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    c = make_shards(tmp_path / "list.csv", tmp_path / "csv_out", maxcount=5, resize=16, workers=1)
    assert c["num_samples"] == 11 and c["class_names"] is None
    with tarfile.open(tmp_path / "csv_out" / "train-000000.tar") as t:
        assert all(n.endswith((".jpg", ".cls")) for n in t.getnames())


def test_make_shards_that_would_write_no_image_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """A list naming only missing files (a text file that is no list, a CSV of moved images) or a source whose
    every image is unreadable printed 'wrote 0 images' and left an empty manifest; now one line naming the source
    and why, and OUT is not left behind."""
    from vitscale.cli import main

    monkeypatch.setenv("VITSCALE_DEBUG", "")
    (tmp_path / "notckpt.txt").write_text("hello\n")
    (tmp_path / "list.csv").write_text("path,label\na.png,0\nb.png,1\n")
    lines = {"notckpt.txt": f"every image listed in {tmp_path / 'notckpt.txt'} is missing (1 listed, e.g. "
                            f"{tmp_path / 'hello'})",
             "list.csv": f"every image listed in {tmp_path / 'list.csv'} is missing (2 listed, e.g. "
                         f"{tmp_path / 'a.png'})"}
    for name, line in lines.items():
        assert main(["make-shards", str(tmp_path / name), str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == f"vitscale: error: make-shards: {line}\n"
        assert not (tmp_path / "out").exists()
    src = tmp_path / "broken"
    src.mkdir()
    (src / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main(["make-shards", str(src), str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vitscale: error: make-shards: none of the 1 image(s) of {src} could be read (e.g. "
                          f"{src / 'x.jpg'}: ") and err.endswith("; nothing written\n") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, raw, why", [
    ("list.jsonl", b'{"path": 5, "label": 1}\n', r"list.jsonl:1: expected a JSON object with 'path'"),
    ("list.jsonl", b'["a.png"]\n', r"list.jsonl:1: expected a JSON object with 'path'"),
    ("list.jsonl", b"[" * 100_000 + b"\n", r"list.jsonl:1: expected a JSON object with 'path'"),
    ("list.jsonl", b'{"path": "\xff.png"}\n', r"list.jsonl is not UTF-8 text \(byte 0xff at position 10\)"),
    ("list.csv", b"path,label\n\xff.png,1\n", r"list.csv is not UTF-8 text \(byte 0xff at position 11\)")],
    ids=["path-int", "row-list", "deep", "jsonl-not-utf8", "csv-not-utf8"])
def test_make_shards_refuses_a_damaged_list_file_in_one_line_naming_it(tmp_path, name, raw, why):
    """Before: TypeError ({"path": 5}), RecursionError, or 'utf-8' codec can't decode naming no file."""
    from vitscale.data.make_shards import make_shards

    (tmp_path / name).write_bytes(raw)
    with pytest.raises(ValueError, match=why) as err:
        make_shards(tmp_path / name, tmp_path / "out", maxcount=5, workers=1)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_make_shards_resumes_an_interrupted_conversion(tmp_path, digits_png, monkeypatch):
    import vitscale.data.make_shards as ms

    src = _image_folder(tmp_path / "src", digits_png)
    clean = ms.make_shards(src, tmp_path / "clean", maxcount=7, workers=1)
    real, calls = ms._process, []

    def dying(job):
        calls.append(job)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(ms, "_process", dying)
    with pytest.raises(KeyboardInterrupt):
        ms.make_shards(src, tmp_path / "out", maxcount=7, workers=1)
    kept = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert kept == ["train-000000.tar", "train-000001.tar"] and not (tmp_path / "out" / "manifest.json").exists()
    mtimes = [os.stat(tmp_path / "out" / n).st_mtime_ns for n in kept]
    monkeypatch.setattr(ms, "_process", real)
    resumed = ms.make_shards(src, tmp_path / "out", maxcount=7, workers=1)
    assert [os.stat(tmp_path / "out" / n).st_mtime_ns for n in kept] == mtimes  # kept, not rewritten
    assert not (tmp_path / "out" / ".progress.json").exists()
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert resumed["skipped"] == clean["skipped"]


def test_worker_batch_buffers_are_reused_only_once_released(demo):
    """Workers stack into a ring of shared buffers; a slot is reused only after the consumer dropped its batch.
    A consumer that keeps every batch gets intact batches (fresh memory); one that drops them gets the same
    batches from reused buffers."""
    train, _ = demo
    kw = dict(batch_size=8, img_size=16, seed=0, rank=0, world_size=1, num_workers=2)

    def shm_inode(t):
        return os.fstat(t.untyped_storage()._share_fd_cpu_()[0]).st_ino

    kept = _take(build_train_loader(train.urls, **kw), 24)
    expected = [b["image"].clone() for b in kept]
    assert len({shm_inode(b["image"]) for b in kept}) == 24  # all held: nothing reused
    assert all(torch.equal(b["image"], e) for b, e in zip(kept, expected))  # and nothing overwritten later
    it = iter(build_train_loader(train.urls, **kw))
    inodes = set()
    for i in range(24):
        batch = next(it)
        assert torch.equal(batch["image"], expected[i]), f"batch {i}"
        inodes.add(shm_inode(batch["image"]))
        del batch
    assert len(inodes) < 12  # dropped: each worker's 4 slots come round again
    assert int(it.releases.table.max()) >= 8  # released batches were told to the workers


def test_head_classes_is_the_one_rule_and_described_reads_nothing(tmp_path):
    """data.num_classes wins, else the first manifest that lists classes; the planner's view of a demo set needs no
    build and a hand-written manifest (plain tarfile shard, not vitscale's writer) is read as the trainer reads it."""
    from vitscale.bench.common import resolve_num_classes
    from vitscale.config.load import load_config
    from vitscale.data.shards import ShardSet, described, head_classes

    assert head_classes(5, ShardSet(urls=["a"], num_classes=7)) == (5, "data.num_classes")
    assert head_classes(0, None, ShardSet(urls=["b.tar"], num_classes=7))[0] == 7
    assert head_classes(None, ShardSet(urls=["a"])) == (0, "unknown")
    cache = tmp_path / "cache"
    assert described("demo:photos").num_classes == 7 and described("demo:digits").urls == []
    assert not cache.exists()
    shard = tmp_path / "s" / "train-0.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for name, data in (("k0.cls", b"3"), ("k0.png", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (shard.parent / "manifest.json").write_text(json.dumps(
        {"num_samples": 1, "num_classes": 4, "shards": [{"name": "train-0.tar", "count": 1}]}))
    assert described(str(shard.parent)).num_classes == 4
    assert described(str(tmp_path / "nowhere")) is None
    cfg = load_config(None, [f"data.train_shards={shard.parent}", f"data.cache_dir={cache}"])
    assert resolve_num_classes(cfg)[0] == resolve_num_classes(cfg, read_shards=True)[0] == 4
    assert resolve_num_classes(cfg, 9) == (9, "--num-classes")
    cfg = load_config(None, ["data.train_shards=demo:digits", "data.num_classes=3", f"data.cache_dir={cache}"])
    assert resolve_num_classes(cfg) == (3, "data.num_classes")
    cfg = load_config(None, [f"data.train_shards={tmp_path}/x-{{0..1}}.tar", f"data.cache_dir={cache}"])
    assert resolve_num_classes(cfg) == (1000, "assumed (ImageNet-1k)")
