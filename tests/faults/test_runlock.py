"""Fault 12: two launches of one run.name. The run directory has one writer: a second launch refuses with one line
naming the holder (host, pid, start time) and writes nothing; a lock whose holder is dead (same host: its process
is gone; another host: no heartbeat for runlock.STALE_S) is taken over with a warning."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import run_cli, train_args
from vitscale.distributed import runlock

ARGS = ["train.steps=2", "train.ckpt_every=2"]


def _lock(run_dir, host, pid, heartbeat):
    run_dir.mkdir(parents=True)
    record = {"host": host, "pid": pid, "start_ticks": runlock._start_ticks(pid), "heartbeat": heartbeat,
              "started": "2026-11-30T01:00:00+00:00", "token": "theirs"}
    (run_dir / runlock.LOCK_NAME).write_text(json.dumps(record))


def test_second_launch_is_refused_naming_the_holder(tmp_path, data_cache):
    """The holder is alive on this host (this test process): refused, one line, nothing written."""
    _lock(tmp_path / "r", socket.gethostname(), os.getpid(), time.time())
    r = run_cli(train_args(tmp_path, "r", data_cache, *ARGS), cwd=tmp_path)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("vitscale: error:")]
    assert len(errors) == 1 and re.fullmatch(
        re.escape(f"vitscale: error: run directory {tmp_path / 'r'} is in use by pid {os.getpid()} on host "
                  f"{socket.gethostname()} (started 2026-11-30T01:00:00+00:00, last heartbeat ") + r"\d+" +
        re.escape(" s ago): another launch of this run is still writing it (two writers would mix checkpoints and "
                  "metrics); stop it, or choose another run.name"), errors[0]), r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [runlock.LOCK_NAME]  # no config, no checkpoint
    assert json.loads((tmp_path / "r" / runlock.LOCK_NAME).read_text())["token"] == "theirs"


def test_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, data_cache):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    _lock(tmp_path / "r", socket.gethostname(), gone.pid, time.time())
    r = run_cli(train_args(tmp_path, "r", data_cache, *ARGS), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"taking over the lock of run directory {tmp_path / 'r'} from pid {gone.pid} on host "
            f"{socket.gethostname()}") in r.stderr and "that process is gone" in r.stderr
    assert (tmp_path / "r" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert not (tmp_path / "r" / runlock.LOCK_NAME).exists()  # released at the end


def test_holder_on_another_host_counts_as_dead_only_without_heartbeat(tmp_path):
    """The other-host rule, on the lock itself (no launch needed): a fresh heartbeat holds, a stale one is taken
    over with a warning, and the new holder's record names this process."""
    _lock(tmp_path / "fresh", "node-alive", 4242, time.time() - 5)
    with pytest.raises(runlock.RunDirectoryInUse, match="is in use by pid 4242 on host node-alive"):
        runlock.RunLock(tmp_path / "fresh").acquire()
    _lock(tmp_path / "stale", "node-that-died", 4242, time.time() - runlock.STALE_S - 60)
    lock = runlock.RunLock(tmp_path / "stale")
    with pytest.warns(UserWarning, match=r"from pid 4242 on host node-that-died .*: no heartbeat for 1[89]\d s"):
        lock.acquire()
    try:
        record = json.loads((tmp_path / "stale" / runlock.LOCK_NAME).read_text())
        assert (record["host"], record["pid"], record["token"]) == (socket.gethostname(), os.getpid(), lock.token)
    finally:
        lock.release()
    assert not (tmp_path / "stale" / runlock.LOCK_NAME).exists()


def test_a_first_launch_that_fails_before_writing_leaves_no_run_folder(tmp_path, data_cache):
    """The lock made the run folder; a launch that fails after taking it (here DeepSpeed refusing a config value
    at initialize) left an empty runs/NAME behind. The folder goes with the lock when nothing else was written."""
    r = run_cli(train_args(tmp_path, "r", data_cache, *ARGS, "engine.ds_config.zero_optimization.sub_group_size=abc"),
                cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        "vitscale: error: DeepSpeedZeroConfig (engine.ds_config) refused: sub_group_size: "), r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_the_lock_removes_only_an_empty_folder_it_made(tmp_path):
    made = runlock.RunLock(tmp_path / "new")
    made.acquire()
    made.release()
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    kept = runlock.RunLock(tmp_path / "old")  # a folder that was there before this launch stays, even empty
    kept.acquire()
    kept.release()
    assert (tmp_path / "old").is_dir()
    written = runlock.RunLock(tmp_path / "w")
    written.acquire()
    (tmp_path / "w" / "config.yaml").write_text("x: 1\n")
    written.release()
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["config.yaml"]
