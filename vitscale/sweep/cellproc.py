"""A cell's ``vitscale`` child process, which ends with the sweep that started it.

The child leads a process group of its own, and what it forks (data workers) is in that group. When the child
ends or times out, the sweep kills what is left of the group; when the sweep is interrupted (Ctrl-C reaches the
sweep only, the child being in another group), it passes SIGINT on; when the sweep dies without a word (SIGKILL,
the out-of-memory killer), the child sees its stdin close and kills its group: distributed/child.py's watch,
reused. Without this, a training orphaned by a killed sweep went on writing its run directory and held its
WRITER.lock, so the relaunched sweep's cell failed on the lock.

Run as ``python -m vitscale.sweep.cellproc ARGS``: the watch, then ``vitscale ARGS`` as ``python -m vitscale``.
"""
from __future__ import annotations

import contextlib
import os
import runpy
import signal
import subprocess
import sys
import threading
from typing import IO, Optional, Sequence

# The converter's stdin-EOF watch and group kill: one implementation of "the child ends with its caller".
from vitscale.distributed.child import end_with_the_caller, kill_group

_LIVE: set[int] = set()  # process groups of the children running now (one per --jobs thread)
_LIVE_LOCK = threading.Lock()


def run(args: Sequence[str], out: IO, env: dict, timeout_s: Optional[float]) -> int:
    """Run ``vitscale ARGS`` with its output to ``out`` and return its exit status. Raises
    ``subprocess.TimeoutExpired`` after ``timeout_s`` seconds; its group is killed then, and on any other way out."""
    proc = subprocess.Popen([sys.executable, "-m", __name__, *args], stdin=subprocess.PIPE, stdout=out,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    with _LIVE_LOCK:
        _LIVE.add(proc.pid)
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc.pid)
        kill_group(proc.pid)  # what the child left, or the child itself on a timeout
        proc.wait()
        proc.stdin.close()  # only now: the child takes its stdin closing for the sweep's death


def interrupt_all() -> None:
    """Pass a Ctrl-C of the sweep on to its running children, as the terminal did when they shared its group; each
    :func:`run` then returns and kills what is left."""
    with _LIVE_LOCK:
        groups = list(_LIVE)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGINT)


def _main() -> None:
    end_with_the_caller()
    runpy.run_module("vitscale", run_name="__main__", alter_sys=True)  # sys.argv[1:] are the vitscale ARGS


if __name__ == "__main__":
    _main()
