"""Rank/world/master from each launcher's environment variables."""
import pytest

from vitscale.distributed.env import DistEnv, LaunchError, detect_env, first_slurm_host, rendezvous_error


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


def test_mpirun_open_mpi_and_mpich():
    """mpirun sets only its own variables (no RANK): each process gets its rank, not rank 0 of a world of one."""
    e = detect_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "node001", "MASTER_PORT": "1234"})
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == (3, 1, 4, 2, 1)
    assert (e.master_addr, e.master_port, e.launcher) == ("node001", 1234, "mpi")
    e = detect_env({"PMI_RANK": "3", "PMI_SIZE": "4"})  # MPICH without hydra's local ids: one node, in order
    assert (e.rank, e.local_rank, e.world_size, e.master_addr, e.master_port) == (3, 3, 4, "127.0.0.1", 29500)
    e = detect_env({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
                    "MASTER_ADDR": "n1"})
    assert (e.rank, e.local_rank, e.node_rank) == (2, 0, 1)
    # mpirun inside an sbatch script: every process inherits the batch step's SLURM_PROCID=0
    e = detect_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "SLURM_PROCID": "0",
                    "SLURM_NTASKS": "1"})
    assert (e.rank, e.world_size, e.launcher) == (1, 2, "mpi")


def test_mpirun_on_several_nodes_needs_master_addr():
    with pytest.raises(LaunchError, match=r"^mpirun started 4 processes on several nodes but MASTER_ADDR is not set: "
                                          r"pass .* \(mpirun -x MASTER_ADDR=<first node>\)$"):
        detect_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})


def test_a_world_without_ranks_is_refused():
    """Two processes with LOCAL_RANK=0/1 and WORLD_SIZE=2 but no RANK used to run as two worlds of one."""
    for local_rank in ("0", "1"):
        with pytest.raises(LaunchError, match=r"^WORLD_SIZE=2 is set but no rank variable is \(RANK, "
                                              r"OMPI_COMM_WORLD_RANK, PMI_RANK or SLURM_PROCID\): start the processes "
                                              r"with deepspeed, torchrun, srun or mpirun, or set RANK"):
            detect_env({"LOCAL_RANK": local_rank, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    assert detect_env({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}).world_size == 1  # a world of one needs no rank


def test_slurm_prefers_the_step_task_count():
    """srun sets SLURM_STEP_NUM_TASKS; SLURM_NTASKS is the allocation's (srun -n 2 inside a 4-task job)."""
    e = detect_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NNODES": "1",
                    "SLURM_JOB_NODELIST": "gpu001"})
    assert (e.rank, e.world_size) == (1, 2)


def test_rendezvous_timeout_names_the_missing_ranks():
    """What engine.setup raises when the process group's rendezvous times out (e.g. sbatch without srun)."""
    slurm = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1",
                        "SLURM_JOB_ID": "12345"})
    err = rendezvous_error(RuntimeError("Timed out after 31 seconds waiting for clients. 1/2 clients joined."),
                           slurm, 30.0)
    assert isinstance(err, LaunchError) and str(err) == (
        "rank 1 never joined rank 0's rendezvous at n1:32345 within 30 s (engine.timeout_s) (world size 2): run it "
        "under srun (srun python -m vitscale ...) so that Slurm starts all 2 tasks")
    four = DistEnv(0, 0, 4, 4, "h", 29500, "torchrun")
    late = RuntimeError("Timed out after 21 seconds waiting for clients. 3/4 clients joined.")
    assert str(rendezvous_error(late, four, 20)).startswith(
        "1 of the 3 other ranks never joined rank 0's rendezvous at h:29500 within 20 s (engine.timeout_s) (world "
        "size 4): start all 4 processes, each with its own RANK")
    two = DistEnv(1, 0, 2, 1, "h", 29500, "deepspeed")
    assert str(rendezvous_error(RuntimeError("The client socket has timed out after 20000ms"), two, 20)) == (
        "rank 1 could not reach rank 0's rendezvous at h:29500 within 20 s (engine.timeout_s) (The client socket has "
        "timed out after 20000ms): is rank 0 running, and are MASTER_ADDR/MASTER_PORT its address and a free port "
        "there?")


def test_rendezvous_port_in_use_and_other_errors():
    env = DistEnv(0, 0, 2, 2, "127.0.0.1", 29611, "deepspeed")
    busy = RuntimeError("The server socket has failed to listen on any local network address. port: 29611, "
                        "useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")
    assert str(rendezvous_error(busy, env, 20)) == ("rank 0 cannot listen on MASTER_PORT 29611 at 127.0.0.1: the port "
                                                   "is in use (another run?): set MASTER_PORT to a free port")
    assert rendezvous_error(RuntimeError("something else"), env, 20) is None  # raised as it is


def test_slurm_nodelist_suffixes_and_several_groups():
    assert first_slurm_host("node[1-4]-ib") == "node1-ib"  # was "node1": the suffix was dropped
    assert first_slurm_host("rack[1-2]-n[01-02]") == "rack1-n01"  # was "rack1"
    assert first_slurm_host("gpu[001-004,010]") == "gpu001"
    assert first_slurm_host("a-b[1-2],c") == "a-b1"
    assert first_slurm_host("gpu-01,gpu-02") == "gpu-01"


def test_slurm_uneven_layouts_give_each_node_its_own_task_count():
    """srun -n 8 over 3 nodes: Slurm lays out 3, 3, 2 tasks ("3(x2),2"); the last node's processes are 2 there, not
    8 // 3, and not SLURM_NTASKS_PER_NODE's first number."""
    from vitscale.distributed.env import slurm_tasks_per_node

    assert slurm_tasks_per_node("3(x2),2") == [3, 3, 2] and slurm_tasks_per_node("4") == [4]
    assert slurm_tasks_per_node("") == [] and slurm_tasks_per_node("2(x") == []
    base = {"SLURM_NTASKS": "8", "SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_ID": "7",
            "SLURM_STEP_TASKS_PER_NODE": "3(x2),2", "SLURM_TASKS_PER_NODE": "3(x2),2"}
    got = [detect_env({**base, "SLURM_PROCID": str(r), "SLURM_NODEID": str(n), "SLURM_LOCALID": str(l)})
           for r, n, l in ((0, 0, 0), (5, 1, 2), (7, 2, 1))]
    assert [e.local_world_size for e in got] == [3, 3, 2]
    assert [e.node_rank for e in got] == [0, 1, 2]  # rank // local_world_size gave 7 // 2 = 3 on the last node
    assert [e.local_rank for e in got] == [0, 2, 1]
    # without a layout: --ntasks-per-node, else the even split
    assert detect_env({**base, "SLURM_STEP_TASKS_PER_NODE": "", "SLURM_TASKS_PER_NODE": "", "SLURM_PROCID": "0",
                       "SLURM_NTASKS_PER_NODE": "4"}).local_world_size == 4


@pytest.mark.parametrize("bad", [{"MASTER_PORT": "abc", "RANK": "0", "WORLD_SIZE": "1"},
                                 {"RANK": "0", "WORLD_SIZE": "two"},
                                 {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "x1"}])
def test_a_launcher_variable_that_is_not_an_integer_is_named(bad):
    name, value = next((k, v) for k, v in bad.items() if not v.isdigit())
    with pytest.raises(LaunchError, match=f"^{name}={value!r} is not an integer"):
        detect_env(bad)
