"""Rank, world size and rendezvous address from whatever launched us.

Supported: the `deepspeed` launcher, torchrun, `accelerate launch` (all three set RANK/WORLD_SIZE/...),
`mpirun` (Open MPI's OMPI_COMM_WORLD_*, or MPICH / Intel MPI's PMI_RANK/PMI_SIZE), Slurm `srun` (SLURM_*
variables), and nothing at all (one process). Pure function of the environment so it can be tested with each
launcher's variables. A world of several processes with no rank variable is refused: each process would
otherwise train alone as rank 0 of one.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

from vitscale.errors import VitscaleError


class LaunchError(VitscaleError, RuntimeError):
    """The launcher's variables do not say which process this is (or where rank 0 is)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "deepspeed" | "torchrun" | "accelerate" | "mpi" | "slurm" | "none"
    node: Optional[int] = None  # the launcher's node index where it says (Slurm: uneven layouts break rank // size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.node if self.node is not None else self.rank // max(self.local_world_size, 1)

    def as_environ(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous reads."""
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist: "gpu[003-005,9],cpu1" -> "gpu003", "rack[1-2]-n[01-02]" -> "rack1-n01".

    Every bracket group of the first host expression takes its first value, so text after a group (a "-ib"
    suffix, another group) is kept."""
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, ch in enumerate(text):  # the first top-level entry: commas inside brackets separate ranges, not hosts
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], text[:end])
    return first or nodelist


def _launcher(env: Mapping[str, str]) -> str:
    if "RANK" in env and "WORLD_SIZE" in env:
        if any(k.startswith("ACCELERATE_") for k in env):
            return "accelerate"
        if "TORCHELASTIC_RUN_ID" in env:
            return "torchrun"
        return "deepspeed"
    # Before Slurm: mpirun inside an sbatch script inherits the batch step's SLURM_PROCID=0 in every process.
    if ("OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env) or ("PMI_RANK" in env and "PMI_SIZE" in env):
        return "mpi"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    return "none"


def _mpi_env(env: Mapping[str, str]) -> DistEnv:
    """mpirun's variables (Open MPI, else MPICH / Intel MPI). They say nothing of the rendezvous address: a single
    node defaults to this host, several nodes need MASTER_ADDR (e.g. ``mpirun -x MASTER_ADDR=node001``)."""
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env.get("LOCAL_WORLD_SIZE", world)))
        local_rank = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("LOCAL_RANK", rank % local_world)))
    else:  # MPICH's hydra sets MPI_LOCALRANKID/MPI_LOCALNRANKS; without them, one node (ranks fill it in order)
        rank, world = int(env["PMI_RANK"]), int(env["PMI_SIZE"])
        local_world = int(env.get("MPI_LOCALNRANKS", env.get("LOCAL_WORLD_SIZE", world)))
        local_rank = int(env.get("MPI_LOCALRANKID", env.get("LOCAL_RANK", rank % local_world)))
    if local_world < world and not env.get("MASTER_ADDR"):
        raise LaunchError(f"mpirun started {world} processes on several nodes but MASTER_ADDR is not set: pass the "
                          "first node's address to every process (mpirun -x MASTER_ADDR=<first node>)")
    return DistEnv(rank, local_rank, world, local_world, env.get("MASTER_ADDR") or "127.0.0.1",
                   int(env.get("MASTER_PORT", 29500)), "mpi")


def slurm_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed task layout, one count per node: "2(x3),1" -> [2, 2, 2, 1]; [] for what is not one."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return []
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _slurm_local_world(env: Mapping[str, str], world: int) -> int:
    """Tasks on this node: the step's layout at this node's index (an uneven layout, 3 tasks on 2 nodes, has 2 on
    the first and 1 on the second), else --ntasks-per-node, else an even split."""
    layout = slurm_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "")))
    node = int(env.get("SLURM_NODEID", -1))
    if 0 <= node < len(layout):
        return layout[node]
    if "SLURM_NTASKS_PER_NODE" in env:
        return int(env["SLURM_NTASKS_PER_NODE"].split("(")[0])
    return max(world // max(int(env.get("SLURM_NNODES", 1)), 1), 1)


def _refuse_rankless(env: Mapping[str, str]) -> None:
    """WORLD_SIZE > 1 with no rank: every process would run alone as rank 0 of one (and collide on the run
    directory), so say what is missing instead."""
    world = env.get("WORLD_SIZE", "1")  # not SLURM_NTASKS: an salloc shell has it, and one process there is fine
    if world.isdigit() and int(world) > 1:
        raise LaunchError(f"WORLD_SIZE={world} is set but no rank variable is (RANK, OMPI_COMM_WORLD_RANK, PMI_RANK or "
                          "SLURM_PROCID): start the processes with deepspeed, torchrun, srun or mpirun, or set RANK "
                          "(0 .. WORLD_SIZE-1) in each")


# The integer variables a launcher sets (or a user exports): a value that is not one is named in one line.
INT_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_PORT",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
                 "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_NODEID",
                 "SLURM_NNODES", "SLURM_JOB_ID")


def detect_env(env: Optional[Mapping[str, str]] = None, local_rank_arg: Optional[int] = None) -> DistEnv:
    """Read the launcher's variables; `local_rank_arg` is the `--local_rank=N` the deepspeed launcher may pass."""
    env = os.environ if env is None else env
    try:
        return _detect(env, local_rank_arg)
    except ValueError:  # int() of a variable: say which one (int's own message names only the text)
        bad = next((k for k in INT_VARIABLES if k in env and not env[k].strip().lstrip("-").isdigit()), None)
        if bad is None:
            raise
        raise LaunchError(f"{bad}={env[bad]!r} is not an integer: check how the job sets or exports it") from None


def _detect(env: Mapping[str, str], local_rank_arg: Optional[int]) -> DistEnv:
    launcher = _launcher(env)
    if launcher in ("deepspeed", "torchrun", "accelerate"):
        world = int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
        return DistEnv(int(env["RANK"]), local_rank, world, local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", 29500)), launcher)
    if launcher == "mpi":
        return _mpi_env(env)
    if launcher == "slurm":
        # srun sets the step's own task count; SLURM_NTASKS is the allocation's, also seen by an sbatch script.
        world = int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
        local_world = _slurm_local_world(env, world)
        master = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST",
                                                                     env.get("SLURM_NODELIST", "127.0.0.1")))
        # A job-id derived port lets concurrent jobs on shared nodes avoid each other.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "9500")) % 20000))
        node = int(env["SLURM_NODEID"]) if "SLURM_NODEID" in env else None
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world, local_world,
                       master, port, "slurm", node)
    _refuse_rankless(env)
    return DistEnv(0, 0, 1, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "none")


def rendezvous_error(error: Exception, env: DistEnv, timeout_s: Optional[float]) -> Optional[LaunchError]:
    """The one line for a process group whose rendezvous failed: which ranks never came and the likely why, or the
    port in use; None for any other error (raised as it is)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "EADDRINUSE" in str(error) or "address already in use" in str(error).lower():
        return LaunchError(f"rank 0 cannot listen on MASTER_PORT {env.master_port} at {env.master_addr}: the port is "
                           "in use (another run?): set MASTER_PORT to a free port")
    if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
        return None
    within = f"within {timeout_s:g} s (engine.timeout_s)" if timeout_s else "in time"
    at = f"{env.master_addr}:{env.master_port}"
    if env.rank == 0:
        m = re.search(r"(\d+)/(\d+) clients joined", text)
        joined = int(m.group(1)) if m else None
        last = env.world_size - 1
        missing = (f"ranks 1-{last}" if last > 1 else "rank 1") if joined in (None, 1) else \
            f"{env.world_size - joined} of the {last} other ranks"
        what = f"{missing} never joined rank 0's rendezvous at {at} {within} (world size {env.world_size})"
    else:
        what = f"rank {env.rank} could not reach rank 0's rendezvous at {at} {within} ({text})"
    if env.launcher == "slurm":
        # Run straight from an sbatch script, only the batch step's one process starts (SLURM_PROCID=0).
        hint = f"run it under srun (srun python -m vitscale ...) so that Slurm starts all {env.world_size} tasks"
    elif env.rank == 0:
        hint = f"start all {env.world_size} processes, each with its own RANK and the same MASTER_ADDR/MASTER_PORT"
    else:
        hint = "is rank 0 running, and are MASTER_ADDR/MASTER_PORT its address and a free port there?"
    return LaunchError(f"{what}: {hint}")
