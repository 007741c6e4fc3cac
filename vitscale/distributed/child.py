"""Running one function in a fresh Python interpreter and getting its failure back as one line.

For work that forks processes of its own (DeepSpeed's universal converter forks a pool of workers): forking a
process whose torch thread pools have run, or whose other threads hold locks, can leave the forked workers waiting
forever (seen: a conversion stuck for 10+ minutes in a process that had run a large matmul). A fresh interpreter
has run nothing, so its forks are safe.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
from pathlib import Path
import signal
import site
import subprocess
import sys

from vitscale import errors

_MARK = "vitscale-child-failed "
_PARENT = "VITSCALE_CHILD_OF"  # the caller's pid, for the child to die with it
_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a process gets when its parent dies (Linux)
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # so the child imports this very vitscale


def run_in_fresh_python(target: str, *args: str) -> None:
    """Call ``target`` ("package.module:function") with the string ``args`` in a new interpreter and wait. Raises
    the child's error with its message: the same class when it is one of :mod:`vitscale.errors`, else RuntimeError
    naming the original class; a child killed by a signal raises RuntimeError naming the signal."""
    proc = subprocess.run([sys.executable, "-m", __name__, target, *args], env=_child_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return
    failure = next((line[len(_MARK):] for line in reversed(proc.stdout.splitlines()) if line.startswith(_MARK)),
                   None)
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
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"{target} exited with status {proc.returncode}: {last}")


def _child_env() -> dict[str, str]:
    """This environment, the caller's pid, and this vitscale's directory on PYTHONPATH when it is a checkout (an
    installed one is in site-packages already, which must not go before the standard library)."""
    env = dict(os.environ, **{_PARENT: str(os.getpid())})
    site_dirs = {str(Path(d).resolve()) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if _PACKAGE_PARENT not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
    return env


def _die_with_parent() -> None:
    """On Linux, be killed when the caller dies: a trainer killed mid-conversion must not leave a converter writing
    into the directory its relaunch converts into again."""
    parent = int(os.environ.get(_PARENT, "0"))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the caller's own cleanup has to do
        return
    if parent and os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _main(target: str, *args: str) -> int:
    _die_with_parent()
    module, function = target.split(":")
    try:
        getattr(importlib.import_module(module), function)(*args)
    except Exception as e:  # reported to the parent as one line, which raises it there
        print(_MARK + json.dumps([type(e).__name__, str(e)]), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:]))
