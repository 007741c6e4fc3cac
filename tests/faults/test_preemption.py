"""Fault 3: SIGTERM (what Slurm sends before preemption) -> checkpoint at the step boundary, exit 0; the next
launch continues at the following step, in the same wandb run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import copy_run, run_cli, step_losses, train_args, wandb_history


def test_sigterm_checkpoints_at_the_step_boundary_and_exits_0(tmp_path, data_cache):
    args = train_args(tmp_path, "pre", data_cache, "train.steps=100000", "train.ckpt_every=100000",
                      "logging.wandb.mode=offline")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "vitscale", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preemption signal: checkpointed at step" in out
    assert re.search(r"exiting \(\d+\.\d s after the signal; engine.preempt_grace_s=30\)", out), out[-2000:]
    last = max(step_losses(tmp_path / "pre"))
    ckpts = tmp_path / "pre" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{last:08d}"  # the step it was in, not an older one
    assert json.loads((ckpts / f"step_{last:08d}" / "trainer_state.json").read_text())["step"] == last

    resumed = run_cli(train_args(tmp_path, "pre", data_cache, f"train.steps={last + 2}", "train.ckpt_every=100000",
                                 "logging.wandb.mode=offline"), cwd=tmp_path, env_extra={"WANDB_MODE": "offline"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / f'step_{last:08d}'} at step {last}" in resumed.stdout
    assert sorted(step_losses(tmp_path / "pre"))[-2:] == [last + 1, last + 2]

    # wandb: both launches wrote to one run id, and its training steps only ever increase
    history = wandb_history(tmp_path / "pre")
    assert len({run_id for run_id, _, _ in history}) == 1
    steps = [step for _, _, step in history]
    assert steps[0] == 1 and last + 2 in steps
    assert all(b > a for a, b in zip(steps, steps[1:])), steps
    assert len(list((tmp_path / "pre" / "wandb").glob("offline-run-*"))) == 2


def test_resume_warns_in_one_line_when_step_plus_checkpoint_exceed_the_grace(tmp_path, data_cache, trained_run):
    """Each checkpoint records its write time (COMPLETE) and the last step's time (trainer_state.json); a resume
    whose sum exceeds engine.preempt_grace_s says so in one line, since a preemption's checkpoint would be killed."""
    copy_run(trained_run, tmp_path)
    ckpt = tmp_path / "tiny" / "checkpoints" / "step_00000004"
    written = json.loads((ckpt / "COMPLETE").read_text())["write_s"]
    step_s = json.loads((ckpt / "trainer_state.json").read_text())["step_s"]
    assert 0 < written < 60 and 0 < step_s < 60
    r = run_cli(train_args(tmp_path, "tiny", data_cache, "train.steps=5", "engine.preempt_grace_s=0.0001"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if "engine.preempt_grace_s" in x]
    assert len(lines) == 1 and lines[0].startswith("warning: the last step took "), r.stderr[-3000:]
    assert "> engine.preempt_grace_s=0.0001" in lines[0] and "--signal=USR1@N" in lines[0]
    assert re.search(r"checkpoint step_00000005: 0\.\d\d GB written in \d+\.\d s", r.stdout), r.stdout[-2000:]
    quiet = run_cli(train_args(tmp_path, "tiny", data_cache, "train.steps=6"), cwd=tmp_path)  # default grace 30 s
    assert quiet.returncode == 0 and "preempt_grace_s" not in quiet.stderr, quiet.stderr[-3000:]


def test_a_signal_during_a_checkpoint_write_stops_at_that_checkpoint(tmp_path, data_cache):
    """SIGTERM while step 2's checkpoint is written: that checkpoint is the preemption's; the run must not start
    step 3, which at real size alone outlasts the launcher's 30 s grace (measured at ViT-L/16: the signal landed in
    a regular save, the next step began, and the ranks were killed in it)."""
    args = train_args(tmp_path, "w", data_cache, "train.steps=100000", "train.ckpt_every=2")
    r = run_cli(args, cwd=tmp_path, env_extra={"VITSCALE_FAULT": "term@ckpt_write,step=2,rank=0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "preemption signal: checkpointed at step 2, exiting" in r.stdout, r.stdout[-2000:]
    assert max(step_losses(tmp_path / "w")) == 2
    assert (tmp_path / "w" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
