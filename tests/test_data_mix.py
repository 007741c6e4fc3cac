"""Weighted multi-source data (data.train_shards as several sources): proportions, determinism, each source's own
epochs, resume on the same and on another world size, bad input, per-source metrics, check-shards per source.

Shards are written with plain tarfile and webdataset.ShardWriter (not vitscale's writer), images are real digits.
"""
import io
import json
import math
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, train_args
from vitscale.config.load import load_config
from vitscale.config.resolve import run_length
from vitscale.config.sources import Source, parse_sources
from vitscale.data.mix import MixSet, bounds_of, build_mix_loader, resolve_train_set, source_of
from vitscale.data.order import seed_of
from vitscale.errors import ConfigError
from vitscale.logging.metrics import read_metrics

KW = dict(img_size=8, shards_in_flight=2, shuffle_buffer=8)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * 255 / 16).astype(np.uint8), d.target.astype(int)


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tar_source(d: Path, prefix: str, digits, n: int, per_shard: int, first: int = 0) -> list[str]:
    """n real digits under keys PREFIX0000.., in shards of per_shard, written with plain tarfile."""
    imgs, labels = digits
    urls = []
    for s in range(n // per_shard):
        path = d / f"{prefix}-{s:04d}.tar"
        with tarfile.open(path, "w") as t:
            for i in range(s * per_shard, (s + 1) * per_shard):
                for name, data in ((f"{prefix}{i:04d}.png", _png(imgs[first + i])),
                                   (f"{prefix}{i:04d}.cls", str(labels[first + i]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def _wds_source(d: Path, prefix: str, digits, n: int, per_shard: int, first: int = 0,
                manifest: bool = False) -> list[str]:
    """n real digits written with webdataset.ShardWriter (and, with ``manifest``, a manifest.json beside them)."""
    import webdataset as wds

    imgs, labels = digits
    d.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(d / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(n):
            w.write({"__key__": f"{prefix}{i:04d}", "png": _png(imgs[first + i]), "cls": str(labels[first + i])})
    urls = sorted(str(p) for p in d.glob(f"{prefix}-*.tar"))
    if manifest:
        shards = [{"name": Path(u).name, "count": min(per_shard, n - i * per_shard)} for i, u in enumerate(urls)]
        (d / "manifest.json").write_text(json.dumps({"shards": shards, "num_samples": n, "num_classes": 10}))
    return urls


def _mix(sources, rank=0, world=1, workers=0, batch=2, seed=5, state=None, **kw):
    return build_mix_loader(sources, seed=seed, rank=rank, world_size=world, num_workers=workers, batch_size=batch,
                            state=state, **{**KW, **kw})


def _global(loaders, batches_each):
    """Batches taken round-robin over ranks (as lockstep ranks do), returned in global-index order:
    [(source, key, image)] for each sample."""
    its = [iter(ld) for ld in loaders]
    out = []
    for _ in range(batches_each):
        for it in its:  # batch b of rank r holds global indices (b * world + r) * B ...: rank order within b
            b = next(it)
            out += list(zip(b["source"].tolist(), b["key"], b["image"]))
    return out


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, digits):
    """A: 120 digits in 6 tarfile shards of 20; B: 60 other digits in 6 ShardWriter shards of 10."""
    d = tmp_path_factory.mktemp("mix")
    a = _tar_source(d, "a", digits, 120, 20)
    b = _wds_source(d / "b", "b", digits, 60, 10, first=500)
    return a, b


# ----- the schedule -------------------------------------------------------------------------------------------
def test_proportions_within_binomial_tolerance_and_world_independent(two_sources):
    """0.7 / 0.3 over 2,000 samples on 2 ranks x 2 workers: each count within 4 binomial sigmas of its share (the
    schedule is in fact within a few samples); the source of every global index is the 1-process run's."""
    a, b = two_sources
    srcs = [(Source("big", "A", 0.7), a), (Source("small", "B", 0.3), b)]
    got = _global([_mix(srcs, rank=r, world=2, workers=2, batch=5) for r in range(2)], 200)
    counts = Counter(s for s, _, _ in got)
    sigma = math.sqrt(2000 * 0.7 * 0.3)
    assert len(got) == 2000 and abs(counts[0] - 1400) <= 4 * sigma and abs(counts[1] - 600) <= 4 * sigma
    assert abs(counts[0] - 1400) <= 3, counts  # the golden-ratio schedule, not a coin: within a few samples
    for start in range(0, 2000, 100):  # and evenly over time, not just on the whole
        window = sum(1 for s, _, _ in got[start:start + 100] if s == 0)
        assert 66 <= window <= 74, (start, window)
    one = _global([_mix(srcs, world=1, workers=0, batch=4)], 500)
    assert [s for s, _, _ in one] == [s for s, _, _ in got]
    bounds = bounds_of([0.7, 0.3])
    assert [source_of(k, bounds, 123) for k in range(50)] == [source_of(k, bounds, 123) for k in range(50)]
    assert all(source_of(k, bounds_of([1.0, 0.0, 2.0]), 7) != 1 for k in range(3000))  # weight 0: never drawn


def test_deterministic_and_exact_resume_on_the_same_layout(two_sources):
    a, b = two_sources
    srcs = [(Source("0", "A", 2.0), a), (Source("1", "B", 1.0), b)]
    first = _global([_mix(srcs, workers=2, batch=3)], 40)
    again = _global([_mix(srcs, workers=2, batch=3)], 40)
    assert [(s, k) for s, k, _ in first] == [(s, k) for s, k, _ in again]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(first, again))
    loader = _mix(srcs, workers=2, batch=3)
    part = _global([loader], 15)
    state = json.loads(json.dumps(loader.state_dict()))
    assert loader.source_samples() == {"0": sum(s == 0 for s, _, _ in part), "1": sum(s == 1 for s, _, _ in part)}
    rest = _global([_mix(srcs, workers=2, batch=3, state=state)], 25)
    assert [(s, k) for s, k, _ in part + rest] == [(s, k) for s, k, _ in first]
    other_seed = _global([_mix(srcs, workers=2, batch=3, seed=6)], 40)
    assert [k for _, k, _ in other_seed] != [k for _, k, _ in first]


def test_a_source_that_runs_out_starts_its_own_next_epoch(tmp_path, digits):
    """B (20 samples) at half the draws runs out long before A (400): B starts its epoch 1, 2, ... each holding
    every B sample once, while A is still in its epoch 0 (no A key repeated)."""
    a = _tar_source(tmp_path, "a", digits, 400, 50)
    b = _wds_source(tmp_path / "b", "b", digits, 20, 10, first=600)
    loader = _mix([(Source("a", "A", 1.0), a), (Source("b", "B", 1.0), b)], batch=4)
    got = _global([loader], 30)
    a_keys = [k for s, k, _ in got if s == 0]
    b_keys = [k for s, k, _ in got if s == 1]
    assert 58 <= len(b_keys) <= 62 and len(a_keys) == 120 - len(b_keys) and len(set(a_keys)) == len(a_keys)
    for e in range(len(b_keys) // 20):
        assert sorted(b_keys[20 * e:20 * (e + 1)]) == [f"b{i:04d}" for i in range(20)], e
    assert b_keys[:20] != b_keys[20:40]  # each epoch is reshuffled
    epochs = [w["epoch"] for w in loader.state_dict()["sources"]["b"]["workers"]]
    assert epochs == [len(b_keys) // 20] and loader.state_dict()["sources"]["a"]["workers"][0]["epoch"] == 0


@pytest.mark.parametrize("before,after,k", [((2, 0), (1, 0), 3), ((2, 2), (1, 0), 1)],
                         ids=["2to1_processes", "2x2_workers_to_1x0"])
def test_resume_on_another_world_size_sees_the_uninterrupted_runs_samples(two_sources, before, after, k):
    """An uninterrupted 1-process run against a run stopped on one layout and resumed on another: the same source
    at every global index, each source's epoch 0 holds the same samples (every one once) with the same pixels, and
    from each source's epoch 1 on the two runs read the same keys in the same order. (With several readers per
    source after the resume, a reader may start its next epoch before the others finish theirs, as in a one-source
    run: each epoch's samples are still read once, but not all before the next epoch's; docs/data.md.)"""
    a, b = two_sources
    srcs = [(Source("a", "A", 0.6), a), (Source("b", "B", 0.4), b)]
    # the cut depends on the readers (order.block_layout): 6 shards in blocks of 3 for 1 or 2 readers, of 1 for 1 or
    # 4, so the uninterrupted run and both layouts cut alike: the same blocks, the same crops
    straight = _global([_mix(srcs, world=1, workers=0, batch=2, shards_in_flight=k)], 220)
    (w0, nw0), (w1, nw1) = before, after
    old = [_mix(srcs, rank=r, world=w0, workers=nw0, batch=2, shards_in_flight=k) for r in range(w0)]
    resumed = _global(old, 12 // w0)
    states = json.loads(json.dumps([ld.state_dict() for ld in old]))
    new = [_mix(srcs, rank=r, world=w1, workers=nw1, batch=2, state=states, shards_in_flight=k) for r in range(w1)]
    assert sum(ld.source_samples()["a"] for ld in new) == sum(s == 0 for s, _, _ in resumed)
    resumed += _global(new, (440 - len(resumed)) // (2 * w1))
    assert len(resumed) == len(straight) == 440
    assert [s for s, _, _ in resumed] == [s for s, _, _ in straight]
    for src, size, prefix in ((0, 120, "a"), (1, 60, "b")):
        mine = [(k, img) for s, k, img in straight if s == src]
        theirs = [(k, img) for s, k, img in resumed if s == src]
        assert len(mine) >= 2 * size
        assert sorted(k for k, _ in theirs[:size]) == sorted(k for k, _ in mine[:size]) == [
            f"{prefix}{i:04d}" for i in range(size)]
        pixels = dict(mine[:size])
        assert all(torch.equal(img, pixels[k]) for k, img in theirs[:size])
        assert [k for k, _ in theirs[size:]] == [k for k, _ in mine[size:]]


# ----- config: the forms and bad input ------------------------------------------------------------------------
def test_the_forms_parse_alike_and_a_plain_spec_is_not_a_mix():
    compact = parse_sources("0.7*d/a-{000..009}.tar + cc=0.3*demo:digits")
    listed = parse_sources([{"shards": "d/a-{000..009}.tar", "weight": 0.7},
                            {"shards": "demo:digits", "weight": 0.3, "name": "cc"}])
    assert compact == listed == [Source("0", "d/a-{000..009}.tar", 0.7), Source("cc", "demo:digits", 0.3)]
    assert parse_sources("d/a-{000..009}.tar") is None and parse_sources("demo:digits") is None
    cfg = load_config(None, ["data.train_shards=0.7*demo:digits + cc=0.3*demo:photos"])
    assert [s.name for s in parse_sources(cfg.data.train_shards)] == ["0", "cc"]


@pytest.mark.parametrize("value,expected", [
    ("[{shards: a.tar, weight: -0.3}]", "data.train_shards[0].weight must be a finite number >= 0, got -0.3"),
    ("[{shards: '', weight: 1}]", "data.train_shards[0].shards is missing or empty"),
    ("[{weight: 1}]", "data.train_shards[0].shards is missing or empty"),
    ("[{shards: a.tar, weight: 0}, {shards: b.tar, weight: 0}]", "data.train_shards: the weights add up to 0"),
    ("[{shards: a.tar, wieght: 1}]", "unknown key 'wieght' in data.train_shards[0] (did you mean 'weight'?)"),
    ("[{shards: a.tar, weight: 1, name: x}, {shards: b.tar, weight: 1, name: x}]",
     "data.train_shards[1].name 'x' is also the name of data.train_shards[0]"),
    ("[]", "data.train_shards is an empty list"),
    ("[{shards: a.tar}]", "data.train_shards[0].weight is missing"),
    ("[{shards: a.tar, weight: lots}]", "data.train_shards[0].weight must be a number, got 'lots'"),
    ("[a.tar]", "data.train_shards[0] must be a mapping"),
    ("[{shards: a.tar, weight: 1, name: 'a b'}]", "data.train_shards[0].name must be 1-64 letters"),
    ("0.7*a.tar + b.tar", "data.train_shards: term 2 'b.tar' is not [NAME=]WEIGHT*SPEC"),
    ("0.7*a.tar + 0.3*0.5*b.tar", "data.train_shards[1].shards is itself a mix"),
])
def test_bad_input_is_one_line_naming_the_key(value, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.train_shards={value}"])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_bad_input_stops_the_cli_before_anything_is_written(tmp_path, data_cache):
    r = run_cli(train_args(tmp_path, "neg", data_cache, "data.train_shards=0.7*demo:digits + -0.3*demo:digits"),
                cwd=tmp_path)
    assert r.returncode == 2 and "term 2" in r.stderr and not (tmp_path / "neg").exists()
    r = run_cli(train_args(tmp_path, "gone", data_cache, f"data.train_shards=0.7*demo:digits + x=0.3*"
                                                         f"{tmp_path}/none-{{0..3}}.tar"), cwd=tmp_path)
    lines = [x for x in r.stderr.splitlines() if x.startswith("vitscale: error:")]
    assert r.returncode == 2 and len(lines) == 1 and "source 'x'" in lines[0] and "none-0.tar" in lines[0]
    assert not (tmp_path / "gone").exists()


# ----- epochs, training metrics, check-shards -----------------------------------------------------------------
def test_epochs_count_the_sum_of_the_sources(tmp_path, digits):
    a = _wds_source(tmp_path / "a", "a", digits, 90, 30, manifest=True)
    b = _tar_source(tmp_path, "b", digits, 40, 20)  # no manifest
    spec = f"3*{tmp_path}/a/manifest.json + b=1*{tmp_path}/b-{{0000..0001}}.tar"
    mix = resolve_train_set(spec)
    assert isinstance(mix, MixSet) and [len(ss.urls) for ss in mix.shard_sets] == [3, 2] and a and b
    assert mix.num_samples is None  # B has no manifest
    cfg = load_config(None, [f"data.train_shards={spec}", "train.epochs=2", "train.steps=null"])
    with pytest.raises(ConfigError, match=r"data.train_shards \(a mix of 2 source\(s\): 0, b\) every source needs "
                                          r"a manifest with sample counts"):
        run_length(cfg, 16, mix.num_samples)
    _wds_source(tmp_path / "b2", "b", digits, 40, 20, manifest=True)
    both = resolve_train_set(f"3*{tmp_path}/a/manifest.json + 1*{tmp_path}/b2 + 0*{tmp_path}/b-0000.tar")
    assert both.num_samples == 130  # 90 + 40; the weight-0 source does not count
    assert run_length(cfg, 16, both.num_samples).steps == math.ceil(2 * 130 / 16)


def test_training_logs_samples_per_source_and_check_shards_reports_each(tmp_path, data_cache, digits):
    side = tmp_path / "side"
    _wds_source(side, "s", digits, 60, 10, first=1000, manifest=True)
    mix = f"0.75*demo:digits + side=0.25*{side}/manifest.json"
    r = run_cli(train_args(tmp_path, "mix", data_cache, f"data.train_shards={mix}", "train.steps=5",
                           "train.ckpt_every=1000", "data.val_shards="), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [m for m in read_metrics(tmp_path / "mix" / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5]
    r = run_cli(train_args(tmp_path, "mix", data_cache, f"data.train_shards={mix}", "train.steps=7",
                           "train.ckpt_every=1000", "data.val_shards="), cwd=tmp_path)  # resumes at step 5
    assert r.returncode == 0 and "at step 5" in r.stdout, r.stderr[-3000:]
    rows = {m["step"]: m for m in read_metrics(tmp_path / "mix" / "metrics.jsonl") if "loss" in m}
    bounds, phase = bounds_of([0.75, 0.25]), seed_of("mix-phase", 0)  # the schedule of run.seed=0
    for step, m in rows.items():
        a, b = m["data/source_0_samples"], m["data/source_side_samples"]
        assert a + b == m["samples"] == 16 * step and abs(b - m["samples"] / 4) <= 2, m
        assert b == sum(source_of(k, bounds, phase) for k in range(m["samples"])), m  # resumed or not
    r = run_cli(["check-shards", "--config", DEMO_CFG, "--set", f"data.train_shards={mix}",
                 f"data.cache_dir={data_cache}", "--workers", "1", "--json", str(tmp_path / "r.json")], cwd=tmp_path)
    assert "source 0 (weight 0.75, 75.0% of samples): demo:digits:" in r.stdout, r.stdout + r.stderr
    assert f"source side (weight 0.25, 25.0% of samples): {side}/manifest.json: 6 shard(s), 60 samples" in r.stdout
    report = json.loads((tmp_path / "r.json").read_text())["sources"]
    assert report["side"]["samples"] == 60 and report["0"]["samples"] > 1000


DEMO_CFG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


@pytest.mark.slow
def test_a_mix_run_resumed_on_another_world_size_keeps_the_schedule(tmp_path, data_cache, digits):
    """2 deepspeed CPU processes train a mix for 3 steps; the run continues on 1 process: the per-source counts of
    every step, before and after, are the schedule's counts at that many samples (carried over from both ranks)."""
    from conftest import deepspeed_cli

    side = tmp_path / "side"
    _wds_source(side, "s", digits, 60, 10, first=1000)
    mix = f"0.75*demo:digits + side=0.25*{side}/s-{{000000..000005}}.tar"
    args = [f"data.train_shards={mix}", "train.ckpt_every=1000", "data.val_shards="]
    port = 29500 + os.getpid() % 400
    r = deepspeed_cli(2, port, train_args(tmp_path, "mix", data_cache, *args, "train.steps=3"), cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    r = run_cli(train_args(tmp_path, "mix", data_cache, *args, "train.steps=5"), cwd=tmp_path)
    assert r.returncode == 0 and "at step 3" in r.stdout, r.stderr[-3000:]
    rows = {m["step"]: m for m in read_metrics(tmp_path / "mix" / "metrics.jsonl") if "loss" in m}
    bounds, phase = bounds_of([0.75, 0.25]), seed_of("mix-phase", 0)
    assert [rows[s]["samples"] for s in range(1, 6)] == [32, 64, 96, 112, 128]
    for m in rows.values():
        side_count = sum(source_of(k, bounds, phase) for k in range(m["samples"]))
        assert (m["data/source_0_samples"], m["data/source_side_samples"]) == (m["samples"] - side_count,
                                                                                side_count), m
