"""A checkpoint write that fails on one rank (its disk full) must not leave that rank's collectives out of step
with the others', who would wait in DeepSpeed's barrier: the failure is recorded while DeepSpeed goes on, and
raised once ``save_checkpoint`` has returned on every rank (``Engine.save``)."""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from vitscale import faults


@contextlib.contextmanager
def writes_recorded(ds_engine: Any, step: int):
    """Inside: DeepSpeed's file writes (its checkpoint engine's save/makedirs, the recovery-script copy) record an
    OSError in the yielded list instead of raising it, and remove the partial file."""
    failed: list[OSError] = []
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def recorded(write, path_arg: int):
        def call(*args, **kwargs):
            if failed:
                return None  # the checkpoint is lost already; spare the disk
            try:
                faults.inject("ds_save", rank=rank, step=step)
                return write(*args, **kwargs)
            except OSError as e:
                failed.append(e)
                path = args[path_arg] if len(args) > path_arg else None
                if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
                    os.unlink(path)
        return call

    ckpt_engine = ds_engine.checkpoint_engine
    patched = [(ckpt_engine, "save", 1), (ckpt_engine, "makedirs", 0), (ds_engine, "_copy_recovery_script", 0)]
    patched = [(obj, name, obj.__dict__.get(name), getattr(obj, name), i) for obj, name, i in patched
               if hasattr(obj, name)]
    for obj, name, _own, original, i in patched:
        setattr(obj, name, recorded(original, i))  # an instance attribute, shadowing the class's method
    try:
        yield failed
    finally:
        for obj, name, own, _original, _i in patched:
            if own is None:
                delattr(obj, name)
            else:
                setattr(obj, name, own)
