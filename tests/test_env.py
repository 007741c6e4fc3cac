"""Rank/world/master from each launcher's environment variables."""
from vitscale.distributed.env import detect_env, first_slurm_host


def test_no_launcher_is_one_process():
    e = detect_env({})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (0, 1, 0, "none")
    assert e.master_port > 0


def test_deepspeed_launcher():
    e = detect_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600", "CROSS_RANK": "1"})
    assert (e.rank, e.local_rank, e.world_size, e.node_rank, e.launcher) == (3, 1, 4, 1, "deepspeed")
    assert (e.master_addr, e.master_port) == ("10.0.0.1", 29600)


def test_torchrun_and_accelerate():
    base = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert detect_env({**base, "TORCHELASTIC_RUN_ID": "x"}).launcher == "torchrun"
    assert detect_env({**base, "ACCELERATE_MIXED_PRECISION": "bf16"}).launcher == "accelerate"


def test_slurm_srun():
    e = detect_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NNODES": "2",
                    "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "4242"})
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == (5, 1, 8, 4, 1)
    assert e.master_addr == "gpu003" and e.launcher == "slurm"
    assert e.master_port == 20000 + 4242


def test_slurm_nodelist_forms():
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("a[10,12-14],b1") == "a10"
