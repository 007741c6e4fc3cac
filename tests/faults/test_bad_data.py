"""Faults 5 and 6 through a real training run: a truncated tar, a corrupt JPEG, an empty shard and a shard that
is missing when it is read are skipped, warned about and counted in the metrics; past data.max_bad_fraction the
run stops with one clear line. Members that would run code if unpickled are never unpickled."""
import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import PicklePayload, run_cli, train_args
from vitscale.data.writer import write_shards
from vitscale.logging.metrics import read_metrics


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """8 shards of 100 real digits (JPEG) listed in shards.txt: shard 1 holds one corrupt JPEG, shard 2 is cut
    in half, shard 3 is an empty tar, shard 4 is read through a `pipe:` command whose file does not exist, and
    every sample of shard 0 carries .pyd/.pickle members whose unpickling would create `pwned`."""
    from sklearn.datasets import load_digits

    d = tmp_path_factory.mktemp("damaged")
    digits = load_digits()
    samples = []
    for i in range(800):
        img = (digits.images[i] * 255 / 16).astype(np.uint8).repeat(4, 0).repeat(4, 1)
        data = _jpeg(np.stack([img] * 3, -1))
        if i == 150:
            data = data[:20] + bytes(len(data) - 20)  # a JPEG header, then nothing decodable
        samples.append((f"s{i:04d}", data, "jpg", int(digits.target[i])))
    write_shards(samples, d / "shards", prefix="train", maxcount=100)
    shards = sorted((d / "shards").glob("train-*.tar"))
    payload = pickle.dumps(PicklePayload(str(d / "pwned")))
    with tarfile.open(shards[0], "a") as t:  # append unsafe members next to shard 0's samples
        for i in range(100):
            for ext in ("pyd", "pickle"):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[:len(data) // 2])
    with tarfile.open(shards[3], "w"):
        pass
    lines = [str(p) for p in shards]
    lines[4] = f"pipe:cat {d / 'gone.tar'}"
    (d / "shards.txt").write_text("\n".join(lines) + "\n")
    return d


def test_bad_data_is_skipped_and_counted(tmp_path, damaged):
    args = train_args(tmp_path, "bad", tmp_path / "cache", f"data.train_shards={damaged / 'shards.txt'}",
                      "data.val_shards=", "data.num_classes=10", "data.shuffle=false", "train.steps=25",
                      "train.log_every=5", "model.img_size=32", "data.max_bad_fraction=0.05")
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    last = [x for x in read_metrics(tmp_path / "bad" / "metrics.jsonl") if "loss" in x][-1]
    # In shard order, 25 x 16 = 400 samples reach shard 6: past every damage once, not yet a second epoch.
    assert last["samples"] == 400
    assert last["data/skipped_samples"] == 1 and last["data/skipped_shards"] == 3
    assert "skipping bad sample s0150" in r.stderr
    for name in ("train-000002.tar", "train-000003.tar", "gone.tar"):
        assert "skipping the rest of shard" in r.stderr and name in r.stderr
    assert "empty shard" in r.stderr
    assert not (damaged / "pwned").exists()


def test_too_much_bad_data_is_one_clear_error(tmp_path, damaged):
    args = train_args(tmp_path, "worse", tmp_path / "cache", f"data.train_shards={damaged / 'shards.txt'}",
                      "data.val_shards=", "data.num_classes=10", "data.shuffle=false", "train.steps=100",
                      "model.img_size=32", "data.max_bad_fraction=0.001")
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 2
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("vitscale: error: too many bad samples: ") and "data.max_bad_fraction=0.001" in error
    assert not (damaged / "pwned").exists()


def test_labels_the_manifest_shows_unusable_stop_before_anything_is_written(tmp_path):
    """Case 7 of issue 20: the manifest already says the labels go up to 9; a run with data.num_classes=5 stops
    with one line before the run directory exists (without a manifest the loader skips and counts them)."""
    args = train_args(tmp_path, "labels", tmp_path / "cache", "data.num_classes=5", "train.steps=2")
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == ("vitscale: error: the shard manifest has labels 0..9 but "
                                                 "data.num_classes=5 allows 0..4")
    assert not (tmp_path / "labels").exists()
    r = run_cli(train_args(tmp_path, "key", tmp_path / "cache", "data.label_key=json"), cwd=tmp_path)
    assert r.returncode == 2 and "data.label_key='json'" in r.stderr and not (tmp_path / "key").exists()
