"""One writer per run directory: the lock rank 0 takes before it writes anything into ``runs/<name>/``.

Launching the same ``run.name`` twice (a double submit, a Slurm requeue while the old job still runs) would let
both write checkpoints and metrics into one folder. The lock is a small JSON file, ``runs/<name>/WRITER.lock``:
host, pid, the process's start time, when it started, and a heartbeat the holder refreshes every
``HEARTBEAT_S`` seconds. A second launch refuses with one line naming the holder. A lock whose holder is dead is
taken over with a warning: on the same host when its process is gone (or the pid now belongs to another process);
on another host when its heartbeat is older than ``STALE_S`` (clocks of the hosts must agree to well within
that). A holder that finds its lock taken over (it was frozen longer than ``STALE_S``) stops at once, so two
writers never overlap for more than one heartbeat.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Optional

from vitscale.distributed import engine as eng
from vitscale.distributed.env import DistEnv
from vitscale.errors import VitscaleError

LOCK_NAME = "WRITER.lock"
HEARTBEAT_S = 20.0
STALE_S = 120.0  # another host's holder counts as dead after this long without a heartbeat

_held: list["RunLock"] = []


class RunDirectoryInUse(VitscaleError, RuntimeError):
    """Another live process holds the run directory's lock."""


def _start_ticks(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (tells a reused pid from the original), if known."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, ticks: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.made_dir = False  # this launch created the run directory (removed at release if still empty)

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
                "started": self.started, "heartbeat": time.time(), "token": self.token}

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        tmp = self.path.with_name(f".{LOCK_NAME}.{self.token}")
        tmp.write_text(json.dumps(self._record()))
        os.replace(tmp, self.path)

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirectoryInUse` naming the holder (creates the run directory)."""
        self.made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
        except FileExistsError:
            holder = self._read()
            why = self._dead(holder)
            if why is None:
                raise RunDirectoryInUse(f"run directory {self.path.parent} is in use by {describe(holder)}: "
                                        f"another launch of this run is still writing it (two writers would mix "
                                        f"checkpoints and metrics); stop it, or choose another run.name") from None
            warnings.warn(f"taking over the lock of run directory {self.path.parent} from {describe(holder)}: "
                          f"{why}", stacklevel=2)
        self._write()
        time.sleep(0.05)  # a launch taking over the same dead lock at the same moment: the last write wins
        if (self._read() or {}).get("token") != self.token:
            raise RunDirectoryInUse(f"run directory {self.path.parent} was just taken by "
                                    f"{describe(self._read())}; stop it, or choose another run.name")
        self._thread = threading.Thread(target=self._beat, name="vitscale-runlock", daemon=True)
        self._thread.start()
        _held.append(self)

    def _dead(self, holder: Optional[dict]) -> Optional[str]:
        """Why the holder counts as dead, or None while it may be alive."""
        if holder is None:  # unreadable: a launch is writing it this instant, or one died doing so
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else STALE_S + 1
            return f"unreadable lock file {age:.0f} s old" if age > 2 * HEARTBEAT_S else None
        if holder.get("host") == socket.gethostname():
            if not _alive(int(holder.get("pid", 0)), holder.get("start_ticks")):
                return "that process is gone (it crashed or was killed)"
            return None
        silent = time.time() - float(holder.get("heartbeat", 0))
        return f"no heartbeat for {silent:.0f} s (more than {STALE_S:.0f} s)" if silent > STALE_S else None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = self._read()
            if holder is not None and holder.get("token") != self.token:
                print(f"vitscale: error: the lock of run directory {self.path.parent} was taken over by "
                      f"{describe(holder)} (this process was unresponsive for more than {STALE_S:.0f} s); "
                      "stopping so that the run keeps one writer", file=sys.stderr, flush=True)
                os._exit(2)
            try:
                self._write()
            except OSError as e:  # a full or flaky disk: the next beat tries again; a stale lock is only a warning
                print(f"warning: could not refresh {self.path}: {e}", file=sys.stderr, flush=True)

    def release(self) -> None:
        self._stop.set()
        if self in _held:
            _held.remove(self)
        if (self._read() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if self.made_dir:  # a launch that failed before writing anything (a bad model.name) leaves no empty run
            try:
                os.rmdir(self.path.parent)  # only ever removes an empty folder
            except OSError:
                pass


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "an unknown process (unreadable lock file)"
    beat = time.time() - float(holder.get("heartbeat", 0))
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}, last "
            f"heartbeat {beat:.0f} s ago)")


def release_all() -> None:
    """Release every lock this process holds (at exit, and before a forced exit)."""
    for lock in list(_held):
        lock.release()


atexit.register(release_all)


def acquire(run_dir: Path, env: DistEnv) -> Optional[RunLock]:
    """Rank 0 takes the run directory's lock; every rank learns the outcome (collective), so either all go on or
    all stop with the same line. Returns the lock on rank 0, None elsewhere."""
    lock, error = None, ""
    if env.is_main:
        try:
            lock = RunLock(run_dir)
            lock.acquire()
        except RunDirectoryInUse as e:
            error = str(e)
    failure = eng.first_failure(error) if env.world_size > 1 else ((0, error) if error else None)
    if failure is not None:
        raise RunDirectoryInUse(failure[1])
    return lock
