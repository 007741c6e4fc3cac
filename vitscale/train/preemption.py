"""Preemption: SIGTERM/SIGUSR1 (Slurm's warning signals) ask for a checkpoint at the next step boundary.

Every rank must stop at the same step, so the signal is agreed on collectively: with ``train.skip_nonfinite`` the
step's loss check carries it, otherwise an all-reduce every few steps (one is a host sync on GPUs). A signal that
arrives while a checkpoint is written makes that checkpoint the preemption's. The loop (train/loop.py) asks this
module three questions; nothing here trains or saves.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

from vitscale.distributed import engine as eng

CHECK_EVERY = 10  # steps between checks for a signal when losses are not checked every step


class Preemption:
    """The signal handlers and the rank-agreed questions about them. Installed by ``Trainer.run`` only: building a
    Trainer (as bench does) leaves the process's signal handlers alone."""

    def __init__(self, grace_s: float = 0.0):
        self.requested = False
        self.since: Optional[float] = None  # time.monotonic() of the first signal
        self.grace_s = grace_s  # engine.preempt_grace_s: what the scheduler leaves between signal and kill
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.requested = True
        self.since = self.since or time.monotonic()

    def seconds(self) -> Optional[float]:
        """Seconds since the signal arrived on this process (None: none arrived here, another rank's did)."""
        return None if self.since is None else time.monotonic() - self.since

    def agreed(self, seen_in_step: bool, step: int, last: bool, skip_nonfinite: bool, log_every: int) -> bool:
        """Whether every rank stops after this step: the step's own loss check said so (``seen_in_step``, with
        ``train.skip_nonfinite``), else an all-reduce on log steps, every ``CHECK_EVERY`` steps and the last."""
        if skip_nonfinite:
            return seen_in_step
        if last or step % min(log_every, CHECK_EVERY) == 0:
            return eng.any_rank(self.requested)
        return False

    def during_save(self, last: bool) -> bool:
        """A signal that arrived while a checkpoint was written: stop now rather than start a step the grace may not
        cover (at ViT-L size a step alone outlasts 30 s). Every rank saves at the same steps, so this all-reduce,
        one a checkpoint, is collective."""
        return not last and eng.any_rank(self.requested)

    def since_signal(self) -> str:
        """`` (N s after the signal; engine.preempt_grace_s=G)`` for the exit line, or "" on a rank without one."""
        seconds = self.seconds()
        if seconds is None:
            return ""
        return f" ({seconds:.1f} s after the signal; engine.preempt_grace_s={self.grace_s:g})"


def grace_warning(step_s: float, written_s: Optional[float], grace_s: float) -> Optional[str]:
    """One line when the last measured step plus its checkpoint's write exceed the grace a preemption leaves."""
    if written_s is None or not step_s or step_s + written_s <= grace_s:
        return None
    return (f"the last step took {step_s:.1f} s and its checkpoint {written_s:.1f} s to write: "
            f"{step_s + written_s:.1f} s > engine.preempt_grace_s={grace_s:g}, so a preemption's checkpoint "
            "would be killed before it completes; signal earlier (Slurm --signal=USR1@N), raise KillWait or "
            "checkpoint more often (docs/multinode.md)")
