"""Fault 7: NaN losses (injected). One is skipped on every rank and counted; after train.rollback_after in a row
the run reloads the last checkpoint and halves the LR, says why, and finishes with finite losses."""
import json
import math

from conftest import run_cli, train_args
from vitscale.logging.metrics import read_metrics


def test_nan_losses_are_skipped_then_rolled_back(tmp_path, data_cache):
    # micro-batch 3 is bad once (skipped: step 3 trains on batch 4); batches 8-10 are bad in a row at step 7
    # (3 = rollback_after): back to the step-6 checkpoint with half the LR. Steps 7.. use batches 11..
    args = train_args(tmp_path, "n", data_cache, "train.steps=10", "train.ckpt_every=3", "train.rollback_after=3",
                      "optim.warmup_steps=0", "optim.lr=0.001")
    r = run_cli(args, cwd=tmp_path, env_extra={"VITSCALE_FAULT": "nan@loss,batches=3;nan@loss,batches=8-10"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("non-finite loss at step") == 4
    assert "3 non-finite losses in a row at step 7: rolled back to" in r.stderr and "scaled by 0.5" in r.stderr

    records = read_metrics(tmp_path / "n" / "metrics.jsonl")
    events = [x for x in records if x.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["step"] == 6 and events[0]["lr_scale"] == 0.5
    steps = [x for x in records if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 11))  # the rollback went back to the last checkpoint (6)
    assert all(math.isfinite(x["loss"]) for x in steps)
    by_step = {x["step"]: x for x in steps}
    assert by_step[3]["nonfinite_losses"] == 1 and by_step[10]["nonfinite_losses"] == 4
    assert by_step[10]["rollbacks"] == 1
    # cosine from 1e-3 over 10 steps, times 0.5 after the rollback
    cosine = [0.5e-3 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    assert by_step[6]["lr"] == cosine[5] and by_step[7]["lr"] == 0.5 * cosine[6]
    # the lowered LR is part of the run's state: a resume keeps it
    state = json.loads((tmp_path / "n" / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())
    assert state["lr_scale"] == 0.5 and state["rollbacks"] == 1 and state["nonfinite_losses"] == 4


def test_nan_without_a_checkpoint_is_a_clear_error(tmp_path, data_cache):
    args = train_args(tmp_path, "n0", data_cache, "train.steps=10", "train.ckpt_every=100", "train.rollback_after=2")
    r = run_cli(args, cwd=tmp_path, env_extra={"VITSCALE_FAULT": "nan@loss,batches=2-9"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "vitscale: error: 2 non-finite losses in a row at step 2 and no checkpoint to roll back to: lower optim.lr "
        "(or optim.blr), raise optim.warmup_steps, or check the data")
