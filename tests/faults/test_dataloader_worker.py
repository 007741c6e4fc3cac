"""Fault 13: a DataLoader worker killed with SIGKILL (as the kernel's OOM killer takes one) stops the run with one
line naming the worker and the likely cause, at a batch boundary (nothing half-written), and the relaunch resumes
exactly: every loss equals the uninterrupted run's."""
import json
import re

from conftest import run_cli, step_losses, train_args

ARGS = ["data.num_workers=2", "train.steps=6", "train.ckpt_every=2", "train.keep_last=0", "data.val_shards="]


def test_worker_killed_stops_with_one_line_and_resumes_exactly(tmp_path, data_cache):
    straight = run_cli(train_args(tmp_path, "straight", data_cache, *ARGS), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    args = train_args(tmp_path, "w", data_cache, *ARGS)
    # Worker 1 SIGKILLs itself as it starts its 3rd batch (the main process has consumed 2-4 batches by then).
    killed = run_cli(args, cwd=tmp_path, env_extra={"VITSCALE_FAULT": "kill@worker,worker=1,batches=3"})
    assert killed.returncode == 2, killed.stderr[-3000:]
    errors = [line for line in killed.stderr.splitlines() if line.startswith("vitscale: error:")]
    assert len(errors) == 1 and "Traceback" not in killed.stderr, killed.stderr[-3000:]
    assert re.fullmatch(r"vitscale: error: data loader worker 1 \(pid \d+\) of rank 0 was killed by SIGKILL: most "
                        r"likely the kernel's out-of-memory killer: the host ran out of memory .*; nothing of the "
                        r"current step was written: relaunch .*", errors[0]), errors[0]
    run = tmp_path / "w"
    ckpts = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts and all((p / "COMPLETE").is_file() for p in ckpts)  # no partial checkpoint
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # every line whole
    assert 2 <= max(r["step"] for r in records) < 6
    assert not (run / "WRITER.lock").exists()  # the run directory is free for the relaunch

    resumed = run_cli(args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts[-1]}" in resumed.stdout
    assert step_losses(run) == step_losses(tmp_path / "straight")  # bit-exact, steps 1-6


def test_a_preemption_signal_reaching_a_worker_does_not_kill_it(tmp_path, data_cache):
    """scancel, Slurm's preemption and the deepspeed launcher's process-tree terminate send SIGTERM to every process
    of the job, DataLoader workers included. A worker killed by it stopped the rank ('worker killed by SIGTERM')
    before the trainer could checkpoint (3 of 4 job-wide SIGTERMs in a review). Workers ignore it: the trainer
    answers it (tests/faults/test_preemption.py), and here, where only the worker got it, the run goes on."""
    straight = run_cli(train_args(tmp_path, "straight", data_cache, *ARGS), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    termed = run_cli(train_args(tmp_path, "t", data_cache, *ARGS), cwd=tmp_path,
                     env_extra={"VITSCALE_FAULT": "term@worker,worker=1,batches=3"})
    assert termed.returncode == 0, termed.stderr[-3000:]
    assert step_losses(tmp_path / "t") == step_losses(tmp_path / "straight")


def test_a_run_ending_on_an_uncaught_error_does_not_wait_for_its_workers(tmp_path):
    """Workers ignore SIGTERM (above); multiprocessing's exit hook SIGTERMs the workers a traceback still holds and
    then joins them, so a run ending on an uncaught error (a CUDA OOM, a bug) hung at exit for good."""
    import subprocess
    import sys

    script = tmp_path / "bug.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader, IterableDataset\n"
        "from vitscale.data.evaluation import worker_init\n"
        "class Forever(IterableDataset):\n"
        "    def __iter__(self):\n"
        "        while True:\n"
        "            yield torch.zeros(1)\n"
        "it = iter(DataLoader(Forever(), batch_size=None, num_workers=1, worker_init_fn=worker_init))\n"
        "next(it)\n"
        "raise RuntimeError('a bug in a training step')\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "RuntimeError: a bug in a training step" in r.stderr, r.stderr[-2000:]
