"""Data at real scale: mixing across class-sorted shards, bounded memory, streaming pipes, elastic resume on another
number of processes or workers, and real-world shards written by other tools (webdataset.ShardWriter, tarfile).

Real images throughout (scikit-learn digits). Each test runs in seconds on 2 CPU cores.
"""
import io
import json
import logging
import struct
import tarfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from vitscale.data.pipeline import build_train_loader
from vitscale.data.stream import WorkerStream
from vitscale.data.shards import ShardSet, check_labels, resolve_shards
from vitscale.data.tario import iter_shard, read_shard
from vitscale.data.transforms import TooLarge, decode


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits():
    """(images 24x24 gray uint8, labels) of all 1,797 real digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images * 255 / 16).astype(np.uint8).repeat(3, 1).repeat(3, 2)
    return imgs, d.target.astype(int)


def _tar(path: Path, members: list, mode: str = "w") -> str:
    """A shard written with plain tarfile: members = [(name, bytes)]."""
    with tarfile.open(path, mode) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory, digits):
    """10 shards written with webdataset.ShardWriter, shard c holding only class c: 500 samples each (the real
    digits of that class, repeated under new keys), the order make-shards used to write an ImageFolder tree in."""
    import webdataset as wds

    d = tmp_path_factory.mktemp("sorted")
    imgs, labels = digits
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        with wds.ShardWriter(str(d / f"c{c}-%06d.tar"), maxcount=10_000, verbose=0) as w:
            for i in range(500):
                w.write({"__key__": f"c{c}_{i:04d}", "png": _png(imgs[idx[i % len(idx)]]), "cls": str(c)})
    return sorted(str(p) for p in d.glob("c*-000000.tar"))


def _epoch_labels(urls, **kw):
    """Labels of slot 0's epoch 0, without decoding."""
    loader = build_train_loader(urls, batch_size=1, img_size=16, seed=0, rank=0, world_size=1, num_workers=0, **kw)
    out = []
    for _, _, label, pos in WorkerStream(loader.plan, 0, decode_images=False):
        if pos["epoch"] > 0:
            return out
        out.append(label)


def _distinct_per_batch(labels, batch=64):
    return float(np.mean([len(set(labels[i:i + batch])) for i in range(0, len(labels) - batch + 1, batch)]))


def test_class_sorted_shards_give_mixed_batches(class_sorted):
    """Mean distinct classes per batch of 64 from one-class shards, with the default shards_in_flight and
    shuffle_buffer: at least 90% of a perfectly shuffled stream's. Reading shard after shard gives ~1."""
    mixed = _epoch_labels(class_sorted)
    assert sorted(mixed) == sorted(c for c in range(10) for _ in range(500))  # every sample once
    perfect = _distinct_per_batch(list(np.random.default_rng(0).permutation(mixed)))
    got = _distinct_per_batch(mixed)
    assert perfect > 9.9 and got >= 0.9 * perfect, (got, perfect)
    one_at_a_time = _distinct_per_batch(_epoch_labels(class_sorted, shards_in_flight=1, shuffle_buffer=0))
    assert one_at_a_time < 1.2


def test_memory_is_bounded_by_the_buffer_not_the_shard(tmp_path):
    """A 24 MB shard (400 x 60 KB) streamed with a 16-sample buffer: Python's peak allocation stays ~1 MB."""
    rng = np.random.default_rng(0)
    members = []
    for i in range(400):
        members += [(f"s{i:04d}.jpg", rng.bytes(60_000)), (f"s{i:04d}.cls", b"1")]
    url = _tar(tmp_path / "big.tar", members)
    loader = build_train_loader([url], batch_size=1, img_size=16, seed=0, rank=0, world_size=1, num_workers=0,
                                shuffle_buffer=16)
    tracemalloc.start()
    n = 0
    for _, _, _, pos in WorkerStream(loader.plan, 0, decode_images=False):
        if pos["epoch"] > 0:
            break
        n += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 400 and peak < 3_000_000, peak


def test_pipe_url_gives_its_first_sample_before_the_shard_ends(tmp_path, digits):
    imgs, labels = digits
    members = []
    for i in range(64):
        members += [(f"p{i:03d}.png", _png(imgs[i])), (f"p{i:03d}.cls", str(labels[i]).encode())]
    path = Path(_tar(tmp_path / "p.tar", members))
    half = path.stat().st_size // 2
    url = f"pipe:sh -c 'head -c {half} {path}; sleep 2; tail -c +{half + 1} {path}'"
    t0 = time.perf_counter()
    it = iter_shard(url)
    first = next(it)
    t_first = time.perf_counter() - t0
    rest = list(it)
    assert t_first < 1.5 and time.perf_counter() - t0 >= 2.0
    assert first["__key__"] == "p000" and len(rest) == 63 and all(isinstance(r, dict) for r in rest)


def test_gzip_shards_read_to_the_end_and_a_single_path_is_a_shard(tmp_path, digits):
    imgs, labels = digits
    members = []
    for i in range(30):
        members += [(f"g{i:03d}.png", _png(imgs[i])), (f"g{i:03d}.cls", str(labels[i]).encode())]
    gz = _tar(tmp_path / "x.tar.gz", members, "w:gz")
    tgz = tmp_path / "y.tgz"
    tgz.write_bytes(Path(gz).read_bytes())
    for path in (gz, str(tgz)):
        assert resolve_shards(path).urls == [path]
        samples, error = read_shard(path)
        assert error is None and [s["__key__"] for s in samples] == [f"g{i:03d}" for i in range(30)]
    data = Path(gz).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[:len(data) * 2 // 3])
    samples, error = read_shard(str(tmp_path / "cut.tar.gz"))
    assert error is not None and 0 < len(samples) < 30
    loader = build_train_loader([gz], batch_size=30, img_size=16, seed=0, rank=0, world_size=1, num_workers=0)
    b = next(iter(loader))
    assert sorted(b["key"]) == [f"g{i:03d}" for i in range(30)] and b["stream"]["skipped"] == 0


# ----- elastic resume ------------------------------------------------------------------------------------------
def _small_set(tmp_path, digits, n=200, per_shard=25, corrupt=()):
    """n real digits in shards of per_shard, written with tarfile; ``corrupt`` indices get unreadable bytes."""
    imgs, labels = digits
    urls = []
    for s in range(n // per_shard):
        members = []
        for i in range(s * per_shard, (s + 1) * per_shard):
            data = b"\x89PNG\r\n\x1a\nbroken" if i in corrupt else _png(imgs[i])
            members += [(f"k{i:04d}.png", data), (f"k{i:04d}.cls", str(labels[i]).encode())]
        urls.append(_tar(tmp_path / f"s-{s:04d}.tar", members))
    return urls


def _run(loaders, batches_each, keys, until_epoch_done=False):
    """Take batches (size 1) round-robin over ranks; record epoch-0 keys. With ``until_epoch_done``, go on until
    every worker of every rank reported epoch >= 1."""
    its = [iter(ld) for ld in loaders]
    done = [set() for _ in loaders]
    n = 0
    while (n < batches_each) if not until_epoch_done else not all(
            len(d) == ld.plan.num_workers for d, ld in zip(done, loaders)):
        for r, it in enumerate(its):
            b = next(it)
            if b["stream"]["epoch"] == 0:
                keys += b["key"]
            else:
                done[r].add(b["stream"]["worker"])
        n += 1
    return keys


@pytest.mark.parametrize("before,after", [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((1, 2), (1, 3))],
                         ids=["2to1_processes", "1to2_processes", "2to3_workers"])
def test_elastic_resume_reads_every_sample_of_the_epoch_once(tmp_path, digits, before, after):
    """Resume on another number of processes (ranks) or workers from every rank's state: the epoch in progress
    is finished, no key repeated, none lost; the skip counters carry over."""
    corrupt = set(range(3, 200, 10))
    urls = _small_set(tmp_path, digits, corrupt=corrupt)
    kw = dict(batch_size=1, img_size=16, seed=11, shards_in_flight=2, shuffle_buffer=16, max_bad_fraction=0.5)
    (w0, nw0), (w1, nw1) = before, after
    old = [build_train_loader(urls, rank=r, world_size=w0, num_workers=nw0, **kw) for r in range(w0)]
    keys = _run(old, 35 // w0, [])
    states = json.loads(json.dumps([ld.state_dict() for ld in old]))
    skipped_before = sum(ld.skipped()[0] for ld in old)
    assert 0 < len(keys) < 100 and skipped_before > 0
    new = [build_train_loader(urls, rank=r, world_size=w1, num_workers=nw1, state=states, **kw) for r in range(w1)]
    assert sum(ld.skipped()[0] for ld in new) == skipped_before
    keys = _run(new, 0, keys, until_epoch_done=True)
    assert sorted(keys) == [f"k{i:04d}" for i in range(200) if i not in corrupt]
    # and the new layout resumes exactly from its own states
    again = [build_train_loader(urls, rank=r, world_size=w1, num_workers=nw1, state=ld.state_dict(), **kw)
             for r, ld in enumerate(new)]
    a, b = next(iter(new[0])), next(iter(again[0]))
    assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_elastic_resume_gives_the_same_augmentation(tmp_path, digits):
    """A sample's crop is seeded by its place in the global order, not by the reader: the pixels of the samples
    read after a 1 -> 2 resume equal the uninterrupted run's."""
    urls = _small_set(tmp_path, digits, n=100)
    kw = dict(batch_size=1, img_size=16, seed=3, shards_in_flight=2, shuffle_buffer=8)
    straight = {}
    it = iter(build_train_loader(urls, rank=0, world_size=1, num_workers=0, **kw))
    for _ in range(100):
        b = next(it)
        straight[b["key"][0]] = b["image"][0]
    first = build_train_loader(urls, rank=0, world_size=1, num_workers=0, **kw)
    _run([first], 30, [])
    new = [build_train_loader(urls, rank=r, world_size=2, num_workers=0, state=[first.state_dict()], **kw)
           for r in range(2)]
    for ld in new:
        b = next(iter(ld))
        assert torch.equal(b["image"][0], straight[b["key"][0]])


# ----- real-world samples --------------------------------------------------------------------------------------
def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): what a decompression bomb looks like."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _exif_jpeg(arr, orientation):
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_any_mode_bit_depth_orientation_and_pixel_limit(digits):
    imgs, _ = digits
    g16 = imgs[0].astype(np.uint16) * 257
    rgb = np.stack([imgs[1], imgs[2], imgs[3]], -1)
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :5] = 255  # a white band on the left
    cases = {
        "png16": _png(g16),
        "palette": _png(np.asarray(Image.fromarray(rgb).convert("P"))),
        "la": _png(np.stack([imgs[0], imgs[0]], -1)),
        "rgba": _png(np.concatenate([rgb, np.full_like(imgs[0][..., None], 128)], -1)),
    }
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG")
    cases["cmyk"] = buf.getvalue()
    for name, data in cases.items():
        x = decode(data)
        assert x.dtype == torch.uint8 and x.shape == (3, 24, 24), name
    assert abs(int(decode(cases["png16"])[0].float().mean()) - int(imgs[0].mean())) <= 1  # scaled, not clipped
    rotated = decode(_exif_jpeg(wide, 6))  # 6: rotate 90 degrees clockwise to display
    assert rotated.shape == (3, 30, 10) and rotated[:, :5].float().mean() > 200  # the band is now on top
    assert decode(_exif_jpeg(wide, 1)).shape == (3, 10, 30)
    with pytest.raises(TooLarge, match="20000x20000"):
        decode(_bomb_png(20000, 20000))
    with pytest.raises(TooLarge):
        decode(cases["png16"], max_pixels=500)


def test_labels_from_cls_txt_json_and_bad_ones_skipped_and_counted(tmp_path, digits, caplog):
    imgs, labels = digits
    members = []
    for i in range(40):
        members.append((f"j{i:03d}.png", _png(imgs[i])))
        label = {7: 12, 8: -1}.get(i, int(labels[i]))  # out of range for 10 classes, negative
        if i == 9:
            members.append((f"j{i:03d}.json", b'{"caption": "no label"}'))
        elif i == 10:
            members.append((f"j{i:03d}.json", b'{"meta": {"label": 99999999999999999999999}}'))
        else:
            members.append((f"j{i:03d}.json", json.dumps({"meta": {"label": label}}).encode()))
        members.append((f"j{i:03d}.txt", str(label).encode()))
    url = _tar(tmp_path / "j.tar", members)
    kw = dict(batch_size=30, img_size=16, seed=0, rank=0, world_size=1, num_workers=0, shuffle=False,
              max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="vitscale.data"):
        loader = build_train_loader([url], label_key="json:meta.label", num_classes=10, **kw)
        b = next(iter(loader))
    good = [i for i in range(40) if i not in (7, 8, 9, 10)]
    assert b["key"] == [f"j{i:03d}" for i in good[:30]] and b["label"].tolist() == labels[good[:30]].tolist()
    assert loader.state_dict()["workers"][0]["skipped"] == 4
    for key, why in (("j007", "label 12 is outside 0..9"), ("j009", "no label"), ("j010", "does not fit int64")):
        assert f"skipping bad sample {key} in {url}: " in caplog.text and why in caplog.text
    b = next(iter(build_train_loader([url], label_key="txt", num_classes=10, **kw)))
    assert b["key"][:8] == ["j000", "j001", "j002", "j003", "j004", "j005", "j006", "j009"]
    # an MAE run does not need labels: nothing is skipped, a bad label is -1
    b = next(iter(build_train_loader([url], label_key="json:meta.label", **kw)))
    assert b["key"] == [f"j{i:03d}" for i in range(30)] and b["label"][7] == 12 and b["label"][10] == -1
    with pytest.raises(ValueError, match="data.label_key"):
        build_train_loader([url], label_key="json", **kw)
    with pytest.raises(ValueError, match="labels -1..12 but data.num_classes=10"):
        check_labels(ShardSet(urls=[url], labels={"min": -1, "max": 12, "missing": 0}), 10)
    with pytest.raises(ValueError, match="lists 3 sample"):
        check_labels(ShardSet(urls=[url], labels={"min": 0, "max": 9, "missing": 3}), 10)
    check_labels(ShardSet(urls=[url], labels={"min": 0, "max": 9, "missing": 3}), 0)  # MAE: fine


def test_a_few_early_bad_files_do_not_stop_a_run(tmp_path, digits):
    """2 unreadable images among the first 100 of 400 (0.5%) with max_bad_fraction=0.01: the run goes on."""
    urls = _small_set(tmp_path, digits, n=400, per_shard=100, corrupt={5, 40})
    loader = build_train_loader(urls, batch_size=50, img_size=16, seed=0, rank=0, world_size=1, num_workers=0,
                                shuffle=False, max_bad_fraction=0.01)
    batches = [b for _, b in zip(range(7), loader)]
    assert batches[-1]["stream"]["skipped"] == 2 and len({k for b in batches for k in b["key"]}) == 350


def test_make_shards_shuffles_globally_and_refuses_a_non_empty_out(tmp_path, digits):
    from vitscale.data.make_shards import make_shards

    imgs, labels = digits
    src = tmp_path / "src"
    for i in range(60):
        d = src / f"class_{labels[i]}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"im{i:03d}.png").write_bytes(_png(imgs[i].astype(np.uint16) * 257 if i == 0 else imgs[i]))
    m = make_shards(src, tmp_path / "out", maxcount=20, workers=1, seed=4)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["order"] == {"shuffled": True, "seed": 4} and m["num_samples"] == 60
    assert manifest["labels"] == {"min": 0, "max": 9, "missing": 0}
    per_shard = [len({s["cls"] for s in read_shard(str(tmp_path / "out" / x["name"]))[0]}) for x in m["shards"]]
    assert min(per_shard) >= 6  # ~20 images of 10 classes in each shard, not one class
    kept = make_shards(src, tmp_path / "kept", maxcount=20, workers=1, shuffle=False)
    first = read_shard(str(tmp_path / "kept" / kept["shards"][0]["name"]))[0]
    first_labels = [int(s["cls"]) for s in first]
    assert first_labels == sorted(first_labels) and first_labels[0] == 0  # source order: class_0 first
    sixteen = [s for x in kept["shards"] for s in read_shard(str(tmp_path / "kept" / x["name"]))[0]
               if s["__key__"].endswith("im000")][0]
    assert sixteen["png"][24] == 8  # the 16-bit PNG was stored as 8-bit
    r = run_cli(["make-shards", str(src), str(tmp_path / "out")], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "already holds shards" in r.stderr


def test_val_shards_null_is_accepted():
    from vitscale.config.load import load_config

    assert load_config(None, ["data.val_shards=null"]).data.val_shards is None


# ----- check-shards --------------------------------------------------------------------------------------------
def test_check_shards_reports_what_would_hurt_training(tmp_path, digits, class_sorted):
    from vitscale.data.check import check_shards

    imgs, labels = digits
    good = _small_set(tmp_path, digits, n=100, per_shard=50)
    ok = check_shards(str(tmp_path / "s-{0000..0001}.tar"), workers=2)
    assert ok["problems"] == [] and ok["samples"] == 100 and sum(ok["labels"].values()) == 100
    assert ok["labels"] == {str(c): int((labels[:100] == c).sum()) for c in range(10)}
    members = [("a.png", _png(imgs[0])), ("a.cls", b"3"), ("b.png", _bomb_png(20000, 20000)), ("b.cls", b"4"),
               ("c.png", b"\x89PNG\r\n\x1a\nbroken"), ("c.cls", b"5"), ("k0000.png", _png(imgs[1])),
               ("k0000.cls", b"12"), ("d.png", _png(imgs[2]))]
    _tar(tmp_path / "bad.tar", members)
    data = Path(good[1]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])
    (tmp_path / "list.txt").write_text(f"{good[0]}\nbad.tar\ncut.tar\n")
    report = check_shards(str(tmp_path / "list.txt"), num_classes=10, workers=2)
    text = "\n".join(report["problems"])
    assert report["over_limit"] == 1 and report["bad_samples"] == 2 and report["damaged_shards"] == 1
    assert report["duplicate_keys"] == 1 and "k0000 in" in text and "20000x20000" in text
    assert "labels outside 0..9" in text and "1 sample(s) without a label" in text and "truncated" in text
    r = run_cli(["check-shards", str(tmp_path / "list.txt"), "--num-classes", "10", "--workers", "1"], cwd=tmp_path)
    assert r.returncode == 1 and "problem: " in r.stdout
    (tmp_path / "binary.txt").write_bytes(b"a.tar\n\xff\xfe\n")  # a binary file given as a list: named, one line
    with pytest.raises(ValueError, match=r"shard list .*binary.txt is not UTF-8 text \(byte at position 6\)"):
        check_shards(str(tmp_path / "binary.txt"), workers=1)
    sorted_report = check_shards(class_sorted[0].replace("c0-", "c{0..9}-"), workers=2)
    assert any("class-sorted" in p for p in sorted_report["problems"])
