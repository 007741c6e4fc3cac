"""End-to-end training through the CLI and DeepSpeed: learning, checkpoints, exact resume, 2 processes."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import DEMO, ROOT, run_cli, train_args
from vitscale.logging.metrics import read_metrics


def _losses(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_kill_and_resume_continues_exactly(tmp_path, data_cache):
    steps = ["train.steps=8", "train.ckpt_every=4"]
    straight = run_cli(train_args(tmp_path, "straight", data_cache, *steps), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    crashed = run_cli(train_args(tmp_path, "resumed", data_cache, *steps), cwd=tmp_path,
                      env_extra={"VITSCALE_CRASH_AFTER_STEP": "5"})
    assert crashed.returncode != 0  # killed like kill -9 after step 5 (its last checkpoint is step 4)
    ckpts = tmp_path / "resumed" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"

    resumed = run_cli(train_args(tmp_path, "resumed", data_cache, *steps), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout

    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    # Steps 1-5 from the first launch, then 5-8 again from the resume at 4: the counter continues at 5.
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    for step in range(5, 9):  # bitwise equal on CPU fp32: same data, same RNG, same weights and optimizer
        assert b[step]["loss"] == a[step]["loss"], (step, a[step]["loss"], b[step]["loss"])
        assert b[step]["lr"] == a[step]["lr"]
    assert a[8]["lr"] < a[4]["lr"]  # cosine decay, no second warmup after resume

    again = run_cli(train_args(tmp_path, "resumed", data_cache, *steps), cwd=tmp_path)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_truncated_newest_checkpoint_falls_back(tmp_path, data_cache):
    args = train_args(tmp_path, "r", data_cache, "train.steps=4", "train.ckpt_every=2", "train.keep_last=0")
    assert run_cli(args, cwd=tmp_path).returncode == 0
    newest = tmp_path / "r" / "checkpoints" / "step_00000004"
    shard = next(newest.glob("*model_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated copy
    r = run_cli(train_args(tmp_path, "r", data_cache, "train.steps=6", "train.ckpt_every=2"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "truncated" in r.stderr and "resumed from" in r.stdout and "step_00000002" in r.stdout


def test_demo_config_learns_digits(tmp_path, data_cache):
    """The README's demo command as written (plus an isolated run dir): held-out accuracy far above chance."""
    r = run_cli(["train", "--config", DEMO, f"run.dir={tmp_path}", f"data.cache_dir={data_cache}",
                 "train.progress=false"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out accuracy" in r.stdout
    records = read_metrics(tmp_path / "demo" / "metrics.jsonl")
    losses = [x["loss"] for x in records if "loss" in x]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3  # loss falls
    val = [x for x in records if "val_acc" in x][-1]
    assert val["val_images"] == 297
    assert val["val_acc"] >= 0.85, val  # chance is 0.10
    cfg = (tmp_path / "demo" / "config.yaml").read_text()
    assert "vit_micro_patch4" in cfg  # the resolved config is saved


@pytest.mark.slow
def test_deepspeed_launcher_two_processes(tmp_path, data_cache):
    """`deepspeed --num_gpus 2 --module vitscale train ...`: 2 CPU processes, sharded checkpoint, rank-0 logs."""
    port = 29000 + os.getpid() % 1000
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module",
           "vitscale", *train_args(tmp_path, "ds2", data_cache, "train.steps=4", "train.ckpt_every=2")]
    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    ckpt = tmp_path / "ds2" / "checkpoints" / "step_00000004"
    assert (ckpt / "COMPLETE").is_file()
    optim_shards = sorted(p.name for p in ckpt.glob("*optim_states.pt"))
    assert len(optim_shards) == 2, optim_shards  # ZeRO-2: one optimizer shard per rank
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["samples"] == 4 * 16 * 2
    assert [r["step"] for r in read_metrics(tmp_path / "ds2" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
