"""The host process's memory (CPU runs: DeepSpeed's CPU accelerator keeps every tensor in malloc'd memory)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import torch


def return_freed_host_memory(threshold: int = 1 << 20) -> None:
    """Tensors on the CPU live in glibc's malloc, which serves blocks below its mmap threshold (grown on the fly up
    to 32 MB) from heaps it rarely gives back: a ViT-L step's freed gathered blocks, gradients and activations stayed
    resident, 1.3 GB a rank above the live tensors (MAE ViT-L/16, ZeRO-3, 2 processes). From ``threshold`` bytes up,
    blocks are mapped on their own and unmapped when freed, so a CPU run's resident memory follows its tensors.
    No effect where there is no glibc, or when MALLOC_MMAP_THRESHOLD_ is set."""
    name = ctypes.util.find_library("c")
    if name is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, threshold)
    mallopt(m_trim_threshold, threshold)


# DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) names one segment per local rank after the rendezvous.
_SHM_SEGMENT = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def unlink_cpu_allreduce_segment() -> None:
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm segment per local rank and never unlinks it: every CPU
    launch on a new port left 132 MB of RAM that nothing frees (82 segments, 5.3 GB, after a day of tests on the
    24 GB machine, where the ViT-H/14 rehearsal then found too little memory for its 1-process resume). Once every
    rank has mapped every other's segment (the barrier: DeepSpeed's initialisation maps them all before it returns),
    each rank unlinks its own name; the mappings live on until the processes exit, however they exit."""
    segment = Path(_SHM_SEGMENT.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                       port=os.environ.get("MASTER_PORT", ""), rank=torch.distributed.get_rank()))
    torch.distributed.barrier()
    segment.unlink(missing_ok=True)
