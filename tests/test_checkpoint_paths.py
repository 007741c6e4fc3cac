"""Which checkpoint a path means (export, model.init, eval and analyze read runs by their folder), and setting a
complete checkpoint aside, on checkpoint folders made here: a COMPLETE marker listing one file and its size."""
import json
import os

import pytest

from vitscale.distributed.checkpoint import CheckpointManager, resolve_checkpoint


def _complete(path, size=3):
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x" * size)
    (path / "COMPLETE").write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": size}}))
    return path


def test_a_run_without_latest_or_with_a_damaged_latest_resolves_to_its_newest_complete_checkpoint(tmp_path):
    """A run copied without checkpoints/latest was "no checkpoint in RUN (the run has not saved one yet)"; a run
    whose latest names a checkpoint damaged since failed although an earlier one was whole."""
    run = tmp_path / "run"
    two, ten = _complete(run / "checkpoints" / "step_00000002"), _complete(run / "checkpoints" / "step_00000010")
    (run / "checkpoints" / "step_00000011").mkdir()  # an interrupted save: never chosen
    _complete(run / "checkpoints" / "step_00000012.replaced-1765000000")  # a set-aside branch: never chosen
    assert resolve_checkpoint(run) == ten and resolve_checkpoint(run / "checkpoints") == ten
    assert resolve_checkpoint(two) == two  # a checkpoint folder is itself
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    assert resolve_checkpoint(run) == two  # latest wins while it is complete
    (two / "mp_rank_00_model_states.pt").write_bytes(b"x")  # truncated
    with pytest.warns(UserWarning, match=r"step_00000002, which .*run's latest names, is not a complete checkpoint "
                                         r"\(file mp_rank_00_model_states.pt is 1 bytes, expected 3 \(truncated\?\)\): "
                                         r"using .*step_00000010"):
        assert resolve_checkpoint(run) == ten


def test_the_same_checkpoint_set_aside_twice_in_a_second_keeps_both(tmp_path, monkeypatch):
    """Set-aside names carry the time in whole seconds; a second set-aside of the same tag within that second made
    os.replace fail on the non-empty folder of the first."""
    import vitscale.distributed.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint.time, "time", lambda: 1765000000.5)
    manager = CheckpointManager(tmp_path, rank=0)
    first = manager._set_aside(_complete(tmp_path / "step_00000004"), warn=False)
    second = manager._set_aside(_complete(tmp_path / "step_00000004", size=5), warn=False)
    assert (first.name, second.name) == ("step_00000004.replaced-1765000000", "step_00000004.replaced-1765000000-2")
    assert [os.path.getsize(p / "mp_rank_00_model_states.pt") for p in (first, second)] == [3, 5]


@pytest.mark.parametrize("latest", [b"s" * 300 + b"\n", b"step_0000\xff\n"], ids=["too-long", "not-utf8"])
def test_a_damaged_latest_file_is_warned_about_naming_it_and_the_newest_checkpoint_used(tmp_path, latest):
    """A 300-character latest was an OSError (File name too long) traceback from is_complete, a non-UTF-8 byte a
    UnicodeDecodeError naming no file."""
    run = tmp_path / "run"
    ten = _complete(run / "checkpoints" / "step_00000010")
    (run / "checkpoints" / "latest").write_bytes(latest)
    with pytest.warns(UserWarning, match=r"checkpoints/latest is unreadable \(.*\): looking for the newest"):
        assert resolve_checkpoint(run) == ten
    (ten / "COMPLETE").unlink()  # nothing complete left: one line, still no traceback
    with pytest.warns(UserWarning, match="latest is unreadable"), pytest.raises(FileNotFoundError):
        resolve_checkpoint(run)
