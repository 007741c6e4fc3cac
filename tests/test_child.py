"""vitscale.distributed.child: work that forks runs in a fresh interpreter, and its failure comes back to the caller
as the same one line (a vitscale error keeps its class), or names the signal that killed it."""
import contextlib
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import PicklePayload
from vitscale.distributed.child import run_in_fresh_python
from vitscale.distributed import engine
from vitscale.errors import CheckpointReadError


@pytest.mark.parametrize("in_child", [True, False], ids=["child", "serial_here"])
def test_a_conversion_refusing_a_hostile_checkpoint_file_raises_that_line_in_the_caller(tmp_path, in_child):
    """A checkpoint file that would open a file when unpickled is refused by DeepSpeed's converter, whether it runs
    in a child process (a large checkpoint) or serially in the caller (a small one): the trainer's rank 0 gets the
    same CheckpointReadError naming the file, with nothing run."""
    ckpt, marker = tmp_path / "step_00000001", tmp_path / "ran"
    ckpt.mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        torch.save({"x": PicklePayload(marker)}, ckpt / name)
    with pytest.raises(CheckpointReadError) as e:
        engine.to_universal(ckpt, ckpt / ".universal.tmp", workers=2 if in_child else 1)
    message = str(e.value)
    assert "\n" not in message and "_states.pt holds more than tensors and plain values" in message, message
    assert "GLOBAL io.open" in message and not marker.exists()


def test_other_failures_name_their_class_and_a_killed_child_its_signal():
    with pytest.raises(RuntimeError, match=r"^JSONDecodeError: Expecting property name"):
        run_in_fresh_python("json:loads", "{")
    with pytest.raises(RuntimeError, match=r"^os:abort was killed by SIGABRT$"):
        run_in_fresh_python("os:abort")
    run_in_fresh_python("json:loads", "{}")  # and success is silent


def test_a_child_dies_with_its_caller():
    """A trainer killed mid-conversion leaves no converter behind to write into the directory its relaunch uses."""
    caller = subprocess.Popen([sys.executable, "-c", "from vitscale.distributed.child import run_in_fresh_python; "
                               "run_in_fresh_python('os:system', 'sleep 60')"])
    grandchildren = []
    try:
        deadline = time.monotonic() + 60
        while not psutil.Process(caller.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = psutil.Process(caller.pid).children()[0]
        grandchildren = child.children(recursive=True)
        caller.kill()
        caller.wait()
        child.wait(timeout=10)  # psutil.TimeoutExpired if it lived on
    finally:
        caller.kill()
        for p in grandchildren:  # the shell and its sleep: only tidiness
            with contextlib.suppress(psutil.Error):
                p.kill()
