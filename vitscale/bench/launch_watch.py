"""Running one launch of a rehearsal (``vitscale preflight``) and watching it: exit status, wall time, output, and the
peak resident memory of every process it starts, read from /proc while it runs."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

POLL_S = 0.5


@dataclass
class Launch:
    """One subprocess's outcome: exit status, wall time, output, the peak resident memory of each rank."""
    returncode: int
    seconds: float
    out: str
    peaks: dict[int, int] = field(default_factory=dict)  # pid -> VmHWM bytes

    def error(self) -> str:
        """The line that says why: a rank's exception or our one-line error, not the launcher's epilogue."""
        lines = [x.strip() for x in self.out.splitlines() if x.strip()]
        launcher = ("launch.py", "runner.py")
        errors = [x for x in lines if re.search(r"(Error|error:|Killed|killed)", x) and not any(
            name in x for name in launcher)]
        return (errors or lines or ["no output"])[-1][:240]


def available_bytes() -> int:
    """Memory this machine can still give (MemAvailable), else all of it."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(cmd: list[str], env: dict, out_dir: Path, on_output=None) -> Launch:
    """Run CMD, polling the peak resident memory (VmHWM) of every process it starts; ``on_output(text, proc)``
    sees the output so far at each poll (for the SIGTERM step). Its log goes to ``out_dir/logs``; it runs in this
    process's directory, so the relative paths of a config and its overrides (data.train_shards, data.cache_dir,
    model.init, --config itself) mean to the launch what they mean to a ``vitscale train`` started here."""
    import psutil

    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"{time.strftime('%H%M%S')}_{Path(cmd[0]).name}_{len(list(logs.iterdir()))}.log"  # kept: the why
    start = time.perf_counter()
    peaks: dict[int, int] = {}
    members: dict[int, psutil.Process] = {}
    with open(log, "w") as f, _signals_raise():
        # its own process group: a preemption signals every process of it, as Slurm signals every task
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            while _running(proc, members):
                with contextlib.suppress(psutil.Error):
                    members.update((c.pid, c) for c in psutil.Process(proc.pid).children(recursive=True))
                for pid in members:
                    peaks[pid] = max(peaks.get(pid, 0), _hwm(pid))
                if on_output is not None:
                    on_output(log.read_text(errors="replace"), proc)
                time.sleep(POLL_S)
        finally:  # interrupted (^C, SIGTERM, SIGHUP), or a launcher gone before its ranks: leave no process behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text(errors="replace")
    return Launch(proc.returncode, time.perf_counter() - start, out, {k: v for k, v in peaks.items() if v})


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) while a launch runs, so that :func:`run`'s cleanup kills the
    launch's process group: the launch has its own session, and the default action of these signals (``timeout``,
    ``scancel``, a closed terminal) ends preflight at once and leaves the launcher and its ranks running. The
    previous handlers come back afterwards. Outside the main thread Python cannot set handlers; nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


LINGER_S = 90  # how long ranks may outlive their launcher: deepspeed's launch.py gives them 30 s after SIGTERM


def _running(proc: subprocess.Popen, members: dict) -> bool:
    """Whether the launch is still running: its first process, or any process it started. The ``deepspeed`` runner
    has no SIGTERM handler on one node and exits at once; its ranks, checkpointing within their grace, must not be
    killed with it (preflight's SIGKILL of the group once the launch is over would cut that checkpoint short)."""
    if proc.poll() is None:
        return True
    ended = getattr(proc, "_ended_at", None) or time.perf_counter()
    proc._ended_at = ended
    alive = [m for m in members.values() if m.is_running() and m.status() != "zombie"]
    return bool(alive) and time.perf_counter() - ended < LINGER_S


def _hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
