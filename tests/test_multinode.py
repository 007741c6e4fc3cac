"""Two nodes simulated on one machine: two per-node deepspeed launches (--no_ssh) of a tiny config (CPU, gloo)."""
import os
import subprocess
import sys

import pytest

from conftest import DEMO, ROOT, TINY, train_args, wandb_history
from vitscale.logging.metrics import read_metrics

pytestmark = pytest.mark.slow


def _launch_two_nodes(tmp_path, data_cache, steps, port):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    env = {**os.environ, "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(port)}
    args = [f"run.dir={tmp_path}", "run.name=mn", f"data.cache_dir={data_cache}", *TINY,
            f"train.steps={steps}", "train.ckpt_every=2", "logging.wandb.mode=offline"]
    procs = []
    for node in (0, 1):
        cmd = ["bash", str(ROOT / "launch/deepspeed_node.sh"), str(hostfile), str(node), "127.0.0.1", DEMO, *args]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def test_two_nodes_train_checkpoint_and_resume(tmp_path, data_cache):
    port = 29700 + os.getpid() % 200
    _launch_two_nodes(tmp_path, data_cache, steps=2, port=port)
    ckpt = tmp_path / "mn" / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").is_file()
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # one ZeRO shard per node's rank
    outs = _launch_two_nodes(tmp_path, data_cache, steps=4, port=port + 1)
    assert "resumed from" in outs[0]
    steps = [r["step"] for r in read_metrics(tmp_path / "mn" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one writer (rank 0), continuing after the resume
    wandb_dirs = list((tmp_path / "mn").glob("wandb/offline-run-*"))
    assert len(wandb_dirs) == 2  # one directory per launch, written by rank 0 only ...
    assert len({d.name.rsplit("-", 1)[1] for d in wandb_dirs}) == 1  # ... with the same run id
    steps = [step for _, _, step in wandb_history(tmp_path / "mn")]
    assert steps == [1, 2, 3, 4]  # one continuous, strictly increasing curve across the two launches
    assert not list(tmp_path.glob("wandb")) and len(list(tmp_path.rglob("offline-run-*"))) == 2  # rank 1: none
    assert (tmp_path / "mn" / "checkpoints" / "step_00000004" / "COMPLETE").is_file()


def test_mpirun_variables_alone_start_a_two_rank_world(tmp_path, data_cache):
    """Processes started as mpirun starts them (OMPI_COMM_WORLD_* only, no RANK) used to run as two worlds of one
    (a port clash, a DeepSpeed assertion); now they train together: one ZeRO shard per rank in the checkpoint."""
    port = 29500 + os.getpid() % 190
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update({"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK":
                    str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": str(port), "WANDB_MODE": "disabled",
                    "DS_ACCELERATOR": "cpu"})
        args = train_args(tmp_path, "mpi", data_cache, "train.steps=2", "train.ckpt_every=2", "data.val_shards=")
        procs.append(subprocess.Popen([sys.executable, "-m", "vitscale", *args], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    ckpt = tmp_path / "mpi" / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").is_file() and len(list(ckpt.glob("*optim_states.pt"))) == 2


def test_sbatch_without_srun_is_one_line_naming_the_missing_rank(tmp_path, data_cache):
    """An sbatch script with --ntasks=2 that runs vitscale itself (no srun) starts one process as rank 0 of 2: it
    used to wait engine.timeout_s and print a DistStoreError traceback; now the wait ends in one line."""
    job = str(5000 + os.getpid() % 5000)  # the Slurm port is derived from the job id
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update({"SLURM_JOB_ID": job, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                "SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "WANDB_MODE": "disabled",
                "DS_ACCELERATOR": "cpu"})
    args = train_args(tmp_path, "sb", data_cache, "train.steps=2", "engine.timeout_s=5")
    r = subprocess.run([sys.executable, "-m", "vitscale", *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=200)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"vitscale: error: rank 1 never joined rank 0's rendezvous at localhost:{20000 + int(job)} within 5 s "
        "(engine.timeout_s) (world size 2): run it under srun (srun python -m vitscale ...) so that Slurm starts all "
        "2 tasks")
