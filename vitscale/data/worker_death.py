"""A DataLoader worker that dies (the kernel's OOM killer takes the biggest process, often a worker) stops the run
with one line naming the worker and the likely cause, at a batch boundary, so nothing is left half-written.

PyTorch notices a dead worker in two ways: its SIGCHLD handler raises ``RuntimeError("DataLoader worker (pid N)
is killed by signal: Killed.")`` in the main thread *wherever it happens to be* (inside a checkpoint save, a
collective, a metrics write), and the loader's own ``next()`` raises "DataLoader worker (pid(s) N) exited
unexpectedly" within a few seconds. :func:`defer_sigchld` turns the first into a note read at the next batch;
:func:`explain` turns either into a :class:`DataError`.
"""
from __future__ import annotations

import re
import signal
import threading
from typing import Any, Optional

from vitscale.errors import DataError

_pending: list[str] = []  # worker deaths seen by the SIGCHLD handler, reported at the next batch
_installed = False


def defer_sigchld() -> None:
    """Wrap PyTorch's SIGCHLD handler (installed by the first multi-process DataLoader iterator) so that a worker's
    death is recorded instead of raised at an arbitrary point of the main thread. Idempotent."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if not callable(torch_handler):
        return

    def handler(signum, frame):
        try:
            torch_handler(signum, frame)
        except RuntimeError as e:
            _pending.append(str(e))

    signal.signal(signal.SIGCHLD, handler)
    _installed = True


def raise_pending(loader_iter: Any, rank: int) -> None:
    """Raise the worker death the SIGCHLD handler recorded, if any (call before taking a batch)."""
    if _pending:
        raise explain(RuntimeError(_pending.pop(0)), loader_iter, rank)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def explain(error: RuntimeError, loader_iter: Any, rank: int) -> Exception:
    """The one-line DataError for a dead worker (``error`` unchanged when it is about something else)."""
    text = str(error)
    if "DataLoader worker (pid" not in text:
        return error
    pids = {int(p) for p in re.findall(r"\d+", text.split("DataLoader worker (pid", 1)[1].split(")")[0])}
    worker, pid, code = _dead_worker(loader_iter, pids)
    if code is not None and code < 0:
        how = f"was killed by {_signal_name(-code)}"
        likely = ("most likely the kernel's out-of-memory killer: the host ran out of memory (lower "
                  "data.num_workers or data.batch_size, or give the job more host memory)") if -code == signal.SIGKILL \
            else ("a bus error is usually too little shared memory (/dev/shm)" if -code == signal.SIGBUS
                  else "it crashed")
    else:
        how, likely = f"exited unexpectedly (exit code {code})", "it crashed"
    return DataError(f"data loader worker {worker} (pid {pid}) of rank {rank} {how}: {likely}; nothing of the "
                     "current step was written: relaunch the same command to resume from the newest complete "
                     "checkpoint")


def _dead_worker(loader_iter: Any, pids: set) -> tuple[str, Optional[int], Optional[int]]:
    """(worker index, pid, exit code) of the dead worker among the iterator's worker processes."""
    workers = list(getattr(loader_iter, "_workers", []) or [])
    for i, w in enumerate(workers):
        if w.pid in pids or (not pids and w.exitcode not in (None, 0)):
            return str(i), w.pid, w.exitcode
    pid = min(pids) if pids else None
    return "?", pid, None
