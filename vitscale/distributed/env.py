"""Rank, world size and rendezvous address from whatever launched us.

Supported: the `deepspeed` launcher, torchrun, `accelerate launch` (all three set RANK/WORLD_SIZE/...),
Slurm `srun` (SLURM_* variables), and nothing at all (one process). Pure function of the environment
so it can be tested with each launcher's variables.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "deepspeed" | "torchrun" | "accelerate" | "slurm" | "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)

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
    """First hostname of a Slurm nodelist like "gpu[003-005,9],cpu1" -> "gpu003"."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _launcher(env: Mapping[str, str]) -> str:
    if "RANK" in env and "WORLD_SIZE" in env:
        if any(k.startswith("ACCELERATE_") for k in env):
            return "accelerate"
        if "TORCHELASTIC_RUN_ID" in env:
            return "torchrun"
        return "deepspeed"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    return "none"


def detect_env(env: Optional[Mapping[str, str]] = None, local_rank_arg: Optional[int] = None) -> DistEnv:
    """Read the launcher's variables; `local_rank_arg` is the `--local_rank=N` the deepspeed launcher may pass."""
    env = os.environ if env is None else env
    launcher = _launcher(env)
    if launcher in ("deepspeed", "torchrun", "accelerate"):
        world = int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
        return DistEnv(int(env["RANK"]), local_rank, world, local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", 29500)), launcher)
    if launcher == "slurm":
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", 1))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", str(world // max(nodes, 1))).split("(")[0])
        master = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST",
                                                                     env.get("SLURM_NODELIST", "127.0.0.1")))
        # A job-id derived port lets concurrent jobs on shared nodes avoid each other.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "9500")) % 20000))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world, local_world,
                       master, port, "slurm")
    return DistEnv(0, 0, 1, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "none")
