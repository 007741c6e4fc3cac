"""Converting a checkpoint to DeepSpeed's universal layout (a resume at another world size or ZeRO stage): how
much disk it needs at its peak, and how many processes convert it."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

from vitscale.distributed import engine as eng
from vitscale.errors import CheckpointReadError

# Peak bytes DeepSpeed's converter writes, per byte of the checkpoint: per-rank fragments of every state under its
# tmp/, then one file per parameter and state, then tmp/ is removed. Measured on ViT-S/16 checkpoints (1 process):
# ZeRO-3 2.96x (its model files hold no weights, so the checkpoint is smaller than what it expands to), ZeRO-2
# fp32 1.51x, ZeRO-1 bf16 1.72x; a margin on top.
CONVERSION_PEAK = {1: 1.9, 2: 1.9, 3: 3.3}


# Below this a checkpoint converts serially in the calling process: 0.2 s for a 2 MB checkpoint, where the fresh
# interpreter a pool of workers needs (engine.to_universal) takes 2-3 s to start; the tests convert dozens.
SERIAL_CONVERSION_BYTES = 64 * 2 ** 20


def conversion_workers(size: int) -> int:
    """How many processes DeepSpeed's converter extracts a checkpoint of SIZE bytes with (1: serially, no fork)."""
    return 1 if size < SERIAL_CONVERSION_BYTES else max(1, min(8, os.cpu_count() or 1))


def check_room_to_convert(path: Path, size: int, old_world: int, old_stage: int) -> None:
    """Refuse in one line, before writing a byte, a conversion the checkpoint's filesystem has no room for: it
    would run for minutes at real size and then die with ENOSPC (the part written is removed either way)."""
    need = int(CONVERSION_PEAK[old_stage] * size)  # stage 0 was refused before: ZeRO 1-3 only
    free = shutil.disk_usage(path).free
    if free < need:
        raise CheckpointReadError(
            f"converting it needs about {need / 2**30:.1f} GB free on its filesystem ({size / 2**30:.1f} GB "
            f"checkpoint, ZeRO-{old_stage}), {free / 2**30:.1f} GB is free: free space there, or resume at world "
            f"size {old_world}, engine.zero_stage={old_stage} as it was written")


def convert_to_universal(path: Path, target: Path, size: int, old_world: int, old_stage: int,
                         mark: Callable[[Path], None]) -> str:
    """Rank 0: convert checkpoint PATH (``size`` bytes) into DeepSpeed's universal layout at TARGET, through a
    temporary folder that ``mark`` marks complete before it replaces TARGET. Returns the error, "" on success: the
    caller reports it on every rank, so no rank waits forever."""
    start = time.perf_counter()
    tmp = path / f".{target.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        check_room_to_convert(path, size, old_world, old_stage)
        eng.to_universal(path, tmp, conversion_workers(size))
        mark(tmp)
        shutil.rmtree(target, ignore_errors=True)  # one converted before the stage-independent layout
        os.replace(tmp, target)
        print(f"converted in {time.perf_counter() - start:.1f} s", flush=True)
        return ""
    except Exception as e:  # reported on every rank by the caller
        shutil.rmtree(tmp, ignore_errors=True)  # a part-written conversion is only taking up the disk
        return str(e) if isinstance(e, CheckpointReadError) else f"{type(e).__name__}: {e}"
