"""checkpoints/best.json as a resume finds it: damaged copies warn (naming the file) and count as no best."""
import os
from types import SimpleNamespace

import pytest

from vitscale.train import validation
from vitscale.train.validation import BEST_INFO, PeriodicValidation


def _validation(ckpt_dir, lines):
    cfg = SimpleNamespace(train=SimpleNamespace(best_metric="val_top1", eval_every=2))
    return PeriodicValidation(cfg, ["v.tar"], 0, 1, ckpt_dir, write=lambda r: None, log=lines.append)


@pytest.mark.parametrize("raw", [b"", b"[1]", b"[" * 100_000, b'{"val_top1": "x"}', b'{"val_top1": [1]}',
                                 b'{"val_top1": NaN}', b'{"val_top1": true}', b'{"val_top1": 0.5, "x": "\xff"}',
                                 b"\x00" * 64])
def test_a_damaged_best_json_warns_naming_it_and_counts_as_no_best(tmp_path, raw):
    (tmp_path / BEST_INFO).write_bytes(raw)
    lines = []
    v = _validation(tmp_path, lines)  # before: JSONDecodeError, AttributeError, RecursionError or a later TypeError
    assert v.best == -1.0
    assert len(lines) == 1 and str(tmp_path / BEST_INFO) in lines[0] and "\n" not in lines[0]
    assert len(lines[0]) < 400


def test_a_sound_best_json_is_read_and_a_missing_metric_is_no_best(tmp_path):
    lines = []
    assert _validation(tmp_path, lines).best == -1.0  # none yet
    (tmp_path / BEST_INFO).write_text('{"tag": "step_00000002", "step": 2, "val_top1": 0.75}')
    assert _validation(tmp_path, lines).best == 0.75
    (tmp_path / BEST_INFO).write_text('{"tag": "step_00000002", "step": 2, "val_top5": 0.75}')
    assert _validation(tmp_path, lines).best == -1.0 and lines == []


def test_best_json_is_synced_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(validation.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(validation.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    v = _validation(tmp_path, [])
    v.pending = {"step": 4, "val_top1": 0.5}
    v.saved("step_00000004", 4)
    assert events == ["fsync", "replace", "fsync", "replace"]
    assert _validation(tmp_path, []).best == 0.5 and (tmp_path / "best").read_text() == "step_00000004\n"
