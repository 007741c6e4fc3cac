"""Running one function in a fresh Python interpreter and getting its failure back as one line.

For work that forks processes of its own (DeepSpeed's universal converter forks a pool of workers): forking a
process whose torch thread pools have run, or whose other threads hold locks, can leave the forked workers waiting
forever (seen: a conversion stuck for 10+ minutes in a process that had run a large matmul). A fresh interpreter
has run nothing, so its forks are safe.

The child leads a process group of its own, and what it forks is in that group. Whenever the child ends, or the
call is interrupted, the caller kills what is left of the group; if the caller dies, the child kills the group
(:func:`end_with_the_caller`). So no worker goes on writing into a directory that a relaunch is converting into
again: the kernel's parent-death signal would reach the child only, never the workers it forked.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path
import signal
import site
import subprocess
import sys
import tempfile
import threading

from vitscale import errors

_MARK = "vitscale-child-failed "
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # so the child imports this very vitscale


def run_in_fresh_python(target: str, *args: str) -> None:
    """Call ``target`` ("package.module:function") with the string ``args`` in a new interpreter and wait. Raises
    the child's error with its message: the same class when it is one of :mod:`vitscale.errors`, else RuntimeError
    naming the original class; a child killed by a signal raises RuntimeError naming the signal."""
    # Files, not pipes, for its output: a worker left alive holds a pipe open, and reading to the end would wait.
    with tempfile.TemporaryFile("w+", errors="replace") as out, tempfile.TemporaryFile("w+", errors="replace") as err:
        proc = subprocess.Popen([sys.executable, "-m", __name__, target, *args], env=_child_env(),
                                stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait()
        finally:
            kill_group(proc.pid)  # what the child left, or the child itself when this wait was interrupted
            proc.wait()
            proc.stdin.close()  # only now: the child takes its stdin closing for this process's death
        stdout, stderr = _read(out), _read(err)
    if proc.returncode == 0:
        return
    failure = next((line[len(_MARK):] for line in reversed(stdout.splitlines()) if line.startswith(_MARK)), None)
    if failure is not None:
        kind, message = json.loads(failure)
        error_class = getattr(errors, kind, None)
        if isinstance(error_class, type) and issubclass(error_class, errors.VitscaleError):
            raise error_class(message)
        raise RuntimeError(f"{kind}: {message}")
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        why = " (most often the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        raise RuntimeError(f"{target} was killed by {name}{why}")
    last = (stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"{target} exited with status {proc.returncode}: {last}")


def _read(file) -> str:
    file.seek(0)
    return file.read()


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # nobody left in it: the usual case
        os.killpg(pgid, signal.SIGKILL)


def _child_env() -> dict[str, str]:
    """This environment, with this vitscale's directory on PYTHONPATH when it is a checkout (an installed one is in
    site-packages already, which must not go before the standard library). PYTHONSAFEPATH (Python 3.11+): ``python
    -m`` would put the working directory first on sys.path, where a stray ``json.py`` or ``vitscale/`` would stand
    in for the modules the caller runs."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    site_dirs = {str(Path(d).resolve()) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if _PACKAGE_PARENT not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
    return env


def end_with_the_caller() -> None:
    """Kill this process group (this child and every worker it forked) when the caller dies. The caller holds the
    other end of this process's stdin and closes it only after this process has ended, so reaching the end of stdin
    means the caller is gone. A thread waits for it: the main thread may sit in one C call for minutes, and forked
    workers do not inherit threads."""
    if os.getpgrp() != os.getpid():  # not started by run_in_fresh_python: the group is someone else's
        return

    def wait_for_the_end() -> None:
        while os.read(0, 4096):
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=wait_for_the_end, name="vitscale-child-watch", daemon=True).start()


def _main(target: str, *args: str) -> int:
    end_with_the_caller()
    module, function = target.split(":")
    try:
        getattr(importlib.import_module(module), function)(*args)
    except Exception as e:  # reported to the parent as one line, which raises it there
        # on a line of its own, whatever the target left unfinished on stdout
        print("\n" + _MARK + json.dumps([type(e).__name__, str(e)]), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:]))
