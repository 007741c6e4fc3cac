"""One rank's failure never hangs the others: every rank learns which rank failed, and why, within engine.timeout_s.

Without this, a rank that dies, hangs or is stopped leaves the others in their next collective until the process
group's timeout (30 minutes by default), and the rank that fails on its own (disk full, a bad file) is the only one
that says why. Three mechanisms, all bounded by ``engine.timeout_s``:

* collectives time out (``engine.setup`` passes the timeout to the process group);
* every rank heartbeats into the rendezvous store (a counter, so clocks need not agree) and watches the next rank
  in a ring: a rank whose counter has not moved for 3/4 of the timeout is declared lost; one on this host whose
  process is gone is declared dead at once. The store lives in rank 0's process: when it stops answering, rank 0
  is the one lost. Every store call has a deadline (``bounded_store``): a client call to a stopped store host
  never returns on its own, and it must not block the watchdog or the failure path;
* a rank that fails with an error of its own publishes it (``rank R: cause``) before it exits.

A rank that learns of another's failure prints one line naming it and exits (code 2) with ``os._exit``: its main
thread may be blocked inside a collective that will never complete, and a process group whose peer vanished can
abort in its destructors. Checkpoints are never marked complete by a half-finished save, so the newest complete
one stays usable and the same command resumes.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
import time
from typing import Iterator, Optional

from vitscale.distributed import runlock
from vitscale.distributed.bounded_store import BoundedStore, StoreTimeout, call_with_deadline
from vitscale.distributed.env import DistEnv
from vitscale.errors import VitscaleError

EXIT_CODE = 2
_PREFIX = "vitscale/watchdog/"
# Words of the errors a collective raises when a peer is gone or silent (gloo, NCCL, the store).
_PEER_SIGNS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe", "timed out", "timeout",
               "socket", "peer")


def _proc_state(pid: int) -> Optional[str]:
    """'R', 'S', 'T' (stopped), 'Z' (zombie) ... of a process on this host, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return "?"
        except ProcessLookupError:
            return None
        except OSError:
            return "?"


class StoreUnanswered(VitscaleError, RuntimeError):
    """Rank 0's rendezvous store does not answer when the watchdog starts."""


class Watchdog:
    """Heartbeats, failure reports and a watch on the next rank, in a daemon thread (world size > 1 only)."""

    def __init__(self, env: DistEnv, timeout_s: float):
        self.env, self.timeout_s = env, float(timeout_s)
        self.interval = min(max(self.timeout_s / 10, 0.5), 10.0)
        self.stale_s = 0.75 * self.timeout_s
        self.culprit: Optional[str] = None  # "rank R ...: cause" once some rank is known to have failed
        self._claimed = threading.Event()  # the main thread handles the failure itself: the thread must not exit
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._store: Optional[BoundedStore] = None
        self._who0: Optional[str] = None  # "host pid" of rank 0, to name it when its store stops answering
        self.host = socket.gethostname()
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun keeps its store across restarts
        self.prefix = f"{_PREFIX}{restart}/"

    # ----- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.env.world_size < 2:
            return
        import torch.distributed as dist

        deadline = max(2 * self.interval, 5.0)
        try:
            client = call_with_deadline(
                lambda: dist.TCPStore(self.env.master_addr, self.env.master_port, is_master=False,
                                      timeout=datetime.timedelta(seconds=deadline), wait_for_workers=False),
                2 * deadline, "connect")
            self._store = BoundedStore(client, deadline)
            self._store.set(f"{self.prefix}who/{self.env.rank}", f"{self.host} {os.getpid()}")
            self._store.add(f"{self.prefix}hb/{self.env.rank}", 1)
        except StoreTimeout as e:
            raise StoreUnanswered(f"rank 0's rendezvous store at {self.env.master_addr}:{self.env.master_port} "
                                  f"does not answer ({e}): is rank 0 stopped or hung?") from None
        self._thread = threading.Thread(target=self._run, name="vitscale-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 5)

    def claim(self) -> None:
        """The main thread is handling an error: from now on it, not the watchdog thread, ends the process."""
        self._claimed.set()

    # ----- failures ------------------------------------------------------------------------------------------
    def report(self, cause: str) -> None:
        """Publish this rank's failure (the first report of the run wins); never raises."""
        self._publish(f"rank {self.env.rank} ({self.host}, pid {os.getpid()}) failed: {cause}")

    def _publish(self, line: str) -> None:
        if self._store is None:
            return
        with contextlib.suppress(Exception):
            if self._store.add(f"{self.prefix}failures", 1) == 1:
                self._store.set(f"{self.prefix}failed", line)

    def linger(self) -> None:
        """Rank 0 hosts the store: after reporting its own failure it waits (a few heartbeats at most) until every
        other rank has read the report, so they can name the cause rather than only rank 0's disappearance."""
        if self._store is None or self.env.rank != 0:
            return
        deadline = time.monotonic() + 2 * self.interval + 1
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self._store.add(f"{self.prefix}read", 0) >= self.env.world_size - 1:
                    return
            time.sleep(0.1)

    def wait_for_culprit(self, seconds: float) -> Optional[str]:
        deadline = time.monotonic() + seconds
        while self.culprit is None and time.monotonic() < deadline and self._thread is not None \
                and self._thread.is_alive():
            time.sleep(0.1)
        return self.culprit

    def die(self, culprit: str) -> None:
        """Say which rank failed and end this process now (see the module docstring for why os._exit)."""
        sys.stdout.flush()
        with contextlib.suppress(Exception):  # os._exit skips atexit: hand the run directory back now

            runlock.release_all()
        print(f"vitscale: error: {culprit}; stopping rank {self.env.rank} too (timeout {self.timeout_s:g} s, "
              "engine.timeout_s): relaunch the same command to resume from the newest complete checkpoint",
              file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)

    # ----- the thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        target = (self.env.rank + 1) % self.env.world_size
        seen, seen_at, store_down_since = -1, time.monotonic(), None
        # Until rank 0's host and pid are known, look every 0.2 s: a run whose first steps are short can lose rank 0
        # before a first full interval has passed, and its line then said "rank 0 (?, pid 0)".
        while not self._stop.wait(self.interval if self._who0 is not None else min(self.interval, 0.2)):
            called_at = time.monotonic()  # a call that hits its deadline counts from when it was made
            try:
                if self._who0 is None and self._store.check([f"{self.prefix}who/0"]):
                    self._who0 = self._store.get(f"{self.prefix}who/0").decode()
                self._store.add(f"{self.prefix}hb/{self.env.rank}", 1)
                if self._store.check([f"{self.prefix}failed"]):
                    culprit = self._store.get(f"{self.prefix}failed").decode()
                    self._store.add(f"{self.prefix}read", 1)
                    self._found(culprit)
                    return
                beat = self._store.add(f"{self.prefix}hb/{target}", 0)
                store_down_since = None
            except Exception as e:  # the store is rank 0's: it died (refused/reset) or stopped (timed out)
                store_down_since = store_down_since or called_at
                if self._store_lost(e, time.monotonic() - store_down_since):
                    return
                continue
            now = time.monotonic()
            if beat != seen:
                seen, seen_at = beat, now
            lost = self._lost(target, now - seen_at)
            if lost:
                self._publish(lost)
                self._found(lost)
                return

    def _store_lost(self, error: Exception, down_s: float) -> bool:
        """Declare rank 0 lost (and return True) once its store is gone, or silent for longer than stale_s."""
        gone = not isinstance(error, TimeoutError) and not any(w in str(error).lower()
                                                               for w in ("timeout", "timed out"))
        if not gone and down_s <= self.stale_s:
            return False
        host, pid = (self._who0 or "? 0").split()
        state = _proc_state(int(pid)) if host == self.host else "?"
        what = "is gone" if gone else f"stopped answering for {down_s:.0f} s"
        if not gone and state in ("T", "t"):
            what += " (it is stopped (SIGSTOP))"
        # A timed-out call's own text varies (which call, or "an earlier call has not returned"): not worth a line.
        why = f": {str(error).splitlines()[0][:120]}" if gone else " does not answer"
        self._found(f"rank 0 ({host}, pid {pid}) {what} (the rendezvous store it hosts{why})")
        return True

    def _lost(self, rank: int, silent_s: float) -> Optional[str]:
        """Why `rank` counts as failed, or None while it is fine."""
        try:
            host, pid = self._store.get(f"{self.prefix}who/{rank}").decode().split()
        except Exception:
            host, pid = "?", "0"
        state = _proc_state(int(pid)) if host == self.host else "?"
        if state in (None, "Z", "X"):
            return (f"rank {rank} ({host}, pid {pid}) died without reporting an error (killed, e.g. by SIGKILL or "
                    "the out-of-memory killer, or crashed)")
        if silent_s > self.stale_s:
            how = "it is stopped (SIGSTOP)" if state in ("T", "t") else "hung, stopped or its host is down"
            return f"rank {rank} ({host}, pid {pid}) stopped responding: no heartbeat for {silent_s:.0f} s ({how})"
        return None

    def _found(self, culprit: str) -> None:
        self.culprit = culprit
        # Give the main thread a moment: a failure all ranks agreed on (e.g. a checkpoint write) is raised there.
        if not self._claimed.wait(min(self.interval, 2.0)):
            self.die(culprit)


def _peer_error(error: BaseException) -> bool:
    """An error a collective raises because another rank is gone or silent (not a fault of this rank)."""
    try:
        import torch.distributed as dist

        if isinstance(error, getattr(dist, "DistError", ())):
            return True
    except ImportError:
        pass
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(sign in text for sign in _PEER_SIGNS)


@contextlib.contextmanager
def watch(env: DistEnv, timeout_s: float) -> Iterator[Watchdog]:
    """Run the block (a whole training run) under a :class:`Watchdog`. An error of this rank is published so the
    others can name it; an error that is really another rank's failure becomes the one line naming that rank."""
    dog = Watchdog(env, timeout_s)
    dog.start()
    try:
        yield dog
    except VitscaleError as e:
        dog.claim()
        dog.report(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        dog.linger()
        raise
    except Exception as e:
        dog.claim()
        culprit = dog.wait_for_culprit(dog.timeout_s) if _peer_error(e) and env.world_size > 1 else None
        if culprit is not None and not culprit.startswith(f"rank {env.rank} "):
            dog.die(culprit)
        dog.report(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        dog.linger()
        raise
    else:
        dog.stop()  # before any rank can exit: rank 0's exit takes the store down, which must not look like a failure
        if env.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
    finally:
        dog.stop()
