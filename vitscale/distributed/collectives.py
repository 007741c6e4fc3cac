"""Plain torch.distributed collectives the loop and checkpointing use (no DeepSpeed): the device, a barrier, summed
scalars, any-rank flags and the first failing rank's error."""
from __future__ import annotations

from typing import Optional

import torch


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few scalars over ranks (used on log steps only: it synchronises)."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. a preemption signal seen by one node)."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def first_failure(error: str, max_bytes: int = 1024) -> Optional[tuple[int, str]]:
    """Collective: (rank, error) of the lowest rank whose `error` is not empty, the same on every rank; None when
    no rank failed. Lets every rank say which rank failed and why, not just that one did."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return (0, error) if error else None
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    failed = torch.zeros(world, dtype=torch.float64, device=device())
    failed[rank] = 1.0 if error else 0.0
    torch.distributed.all_reduce(failed)
    ranks = failed.nonzero().flatten().tolist()
    if not ranks:
        return None
    text = torch.zeros(max_bytes, dtype=torch.uint8, device=device())
    if rank == ranks[0]:
        data = error.encode()[:max_bytes]
        text[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    torch.distributed.broadcast(text, src=ranks[0])
    return ranks[0], bytes(text.cpu().tolist()).rstrip(b"\0").decode(errors="replace")


def teardown() -> None:
    """End the process group after every rank is done (idempotent; nothing to do in a single process).

    A process that exits with the group's threads still running can abort at interpreter shutdown ("terminate
    called without an active exception", exit 250) after all its work is done: seen once in the 2-process engine
    test. A launcher or Slurm then reports the finished run as failed and may requeue it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
