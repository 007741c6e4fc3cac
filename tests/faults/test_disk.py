"""Fault 4: the disk fills up (or the run directory becomes unwritable) while a checkpoint is written: a clear
one-line error, the partial checkpoint is removed, the previous complete one is intact and resumable."""
from conftest import run_cli, step_losses, train_args


def test_disk_full_while_saving(tmp_path, data_cache):
    args = train_args(tmp_path, "d", data_cache, "train.steps=6", "train.ckpt_every=2")
    failed = run_cli(args, cwd=tmp_path, env_extra={"VITSCALE_FAULT": "enospc@ckpt_write,step=4"})
    assert failed.returncode == 2
    ckpts = tmp_path / "d" / "checkpoints"
    error = [line for line in failed.stderr.splitlines() if line.startswith("vitscale: error:")]
    assert error == [f"vitscale: error: could not write checkpoint {ckpts / 'step_00000004'}: [Errno 28] No space "
                     f"left on device (injected by VITSCALE_FAULT); the previous checkpoint "
                     f"{ckpts / 'step_00000002'} is intact"], failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    assert not (ckpts / "step_00000004").exists()  # no half-written directory holding the space
    assert (ckpts / "latest").read_text().strip() == "step_00000002"

    resumed = run_cli(args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 2" in resumed.stdout and sorted(step_losses(tmp_path / "d")) == list(range(1, 7))
