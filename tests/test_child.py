"""vitscale.distributed.child: work that forks runs in a fresh interpreter, and its failure comes back to the caller
as the same one line (a vitscale error keeps its class), or names the signal that killed it."""
import contextlib
import subprocess
import sys
import threading
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


def _descendants_when_started(parent: psutil.Process, count: int) -> list[psutil.Process]:
    """PARENT's descendants once there are COUNT of them (the child, then what os.system starts in it)."""
    deadline = time.monotonic() + 60
    while len(found := parent.children(recursive=True)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(found) >= count, found
    return found


def _gone(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of PROCESSES still running after 10 s."""
    _, alive = psutil.wait_procs(processes, timeout=10)
    return alive


def test_a_child_and_what_it_forked_die_with_its_caller():
    """A trainer killed mid-conversion leaves nothing behind to write into the directory its relaunch converts into:
    neither the child nor what the child forked (here a shell and its sleep, as the converter forks its workers;
    the kernel gives those no parent-death signal of their own)."""
    caller = subprocess.Popen([sys.executable, "-c", "from vitscale.distributed.child import run_in_fresh_python; "
                               "run_in_fresh_python('os:system', 'sleep 60')"])
    below = []
    try:
        below = _descendants_when_started(psutil.Process(caller.pid), 2)
        caller.kill()
        caller.wait()
        assert not _gone(below), "lived on after their caller was killed"
    finally:
        caller.kill()
        for p in below:
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_what_a_killed_child_forked_is_killed_too_and_the_caller_names_the_signal():
    """The kernel's OOM killer takes the child, the largest process, and spares the workers it forked: the caller
    kills them before it raises."""
    failed = []

    def call():
        try:
            run_in_fresh_python("os:system", "sleep 60")
        except RuntimeError as e:
            failed.append(str(e))

    caller = threading.Thread(target=call)
    caller.start()
    below = []
    try:
        below = _descendants_when_started(psutil.Process(), 2)
        child = next(p for p in below if "vitscale.distributed.child" in " ".join(p.cmdline()))
        child.kill()
        caller.join(timeout=30)
        assert not caller.is_alive() and failed and failed[0].startswith("os:system was killed by SIGKILL"), failed
        assert not _gone(below)
    finally:
        for p in below:
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_a_failure_after_unfinished_or_undecodable_output_keeps_its_line(tmp_path, monkeypatch):
    """The target's last stdout line without its newline, and bytes that are not UTF-8, on either stream: the failure
    still comes back as its own line. A module in the working directory named like one the child imports (json)
    does not replace it."""
    (tmp_path / "noisy.py").write_text("import sys\n"
                                       "def fail():\n"
                                       "    sys.stdout.buffer.write(b'half a line \\xff'); sys.stdout.flush()\n"
                                       "    sys.stderr.buffer.write(b'\\xfe\\n'); sys.stderr.flush()\n"
                                       "    raise ValueError('the real error')\n")
    (tmp_path / "json.py").write_text("raise SystemExit('the working directory shadowed json')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "modules"))
    (tmp_path / "modules").mkdir()
    (tmp_path / "noisy.py").rename(tmp_path / "modules" / "noisy.py")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match=r"^ValueError: the real error$"):
        run_in_fresh_python("noisy:fail")
