"""Fault injection for the reliability tests (tests/faults/): each fault the trainer must survive can be
triggered at a named point of a real run, in a real process, so the tests exercise the real recovery code.

``VITSCALE_FAULT="KIND@POINT[,step=N][,rank=R][,batches=A-B][,worker=W]"``; several faults separated by ``;``.

Kinds and where they act:
  kill    SIGKILL this process (as ``kill -9`` or an OOM kill would), at ``after_step`` (end of step N), ``mid_step``
          (step N, after backward, before the optimizer step) or ``ckpt_write`` (saving step N: after the shards,
          before the checkpoint is marked complete), ``final_eval`` (the end-of-run held-out evaluation, after the
          last checkpoint); at ``worker``, DataLoader worker W of rank R SIGKILLs itself
          when it produces its batch A (``batches=A``), as when the OOM killer takes a worker
  stop    SIGSTOP this process (a hung rank: alive, holding its connections, doing nothing) at ``mid_step``
  enospc  raise ``OSError(ENOSPC)`` at ``ckpt_write``, or at ``ds_save`` (inside DeepSpeed's save_checkpoint, when
          it writes a file of step N), as a full disk would
  term    SIGTERM this process (Slurm's preemption signal) at ``ckpt_write``: the signal lands during a write; at
          ``worker``, DataLoader worker W SIGTERMs itself at its batch A, as a job-wide preemption signal reaches it
  nan     make the loss NaN at ``loss`` for the trainer's micro-batches number A..B (1-based, counted over the
          whole process, so a rollback that repeats step numbers does not repeat the fault)
Without the variable nothing here does anything.
"""
from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from typing import Optional

ENV = "VITSCALE_FAULT"
KINDS = {"kill": ("after_step", "mid_step", "ckpt_write", "worker", "final_eval"), "stop": ("mid_step",),
         "enospc": ("ckpt_write", "ds_save"), "term": ("ckpt_write", "worker"), "nan": ("loss",)}


@dataclass(frozen=True)
class Fault:
    kind: str
    point: str
    step: Optional[int] = None
    rank: Optional[int] = None
    batches: Optional[tuple[int, int]] = None
    worker: Optional[int] = None

    def matches(self, point: str, step: Optional[int], rank: int, batch: Optional[int],
                worker: Optional[int] = None) -> bool:
        if point != self.point or (self.rank is not None and rank != self.rank):
            return False
        if self.worker is not None and worker != self.worker:
            return False
        if self.step is not None and step != self.step:
            return False
        return self.batches is None or (batch is not None and self.batches[0] <= batch <= self.batches[1])


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        head, *opts = item.split(",")
        kind, _, point = head.partition("@")
        if point not in KINDS.get(kind, ()):
            raise ValueError(f"{ENV}: bad fault {item!r}: kinds and points are {KINDS}")
        kw: dict = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key in ("step", "rank", "worker"):
                kw[key] = int(value)
            elif key == "batches":
                lo, _, hi = value.partition("-")
                kw["batches"] = (int(lo), int(hi or lo))
            else:
                raise ValueError(f"{ENV}: unknown option {key!r} in {item!r}")
        faults.append(Fault(kind, point, **kw))
    return faults


def _active() -> list[Fault]:
    spec = os.environ.get(ENV)
    return parse(spec) if spec else []


def inject(point: str, *, rank: int, step: Optional[int] = None, batch: Optional[int] = None,
           worker: Optional[int] = None) -> None:
    """Act out a kill/stop/enospc fault configured for this point, if any."""
    for fault in _active():
        if not fault.matches(point, step, rank, batch, worker):
            continue
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        if fault.kind == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        if fault.kind == "enospc":
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {ENV})")


def poison_loss(*, rank: int, batch: int) -> bool:
    """True if a ``nan@loss`` fault covers this micro-batch on this rank."""
    return any(f.kind == "nan" and f.matches("loss", None, rank, batch) for f in _active())
