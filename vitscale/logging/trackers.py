"""Experiment tracking (wandb) on rank 0 only; the run id is kept in checkpoints so resumes continue one run."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional


INIT_TIMEOUT_S = 90.0  # wandb's own wait for its server (a large run's resume can take long); then offline


def resolve_mode(mode: str) -> str:
    """"auto" -> online if an API key or netrc login exists, else offline (never a prompt, never a crash)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if logged_in else "offline"


class Tracker:
    """No-op on non-zero ranks and when disabled."""

    def __init__(self, *, enabled: bool, mode: str, project: str, entity: Optional[str], name: str,
                 run_dir: Path, config: dict, run_id: Optional[str] = None):
        self.run = None
        self.mode = resolve_mode(mode)
        if not enabled or self.mode == "disabled":
            return
        import wandb  # startup: wandb adds 0.6 s and starts nothing until a run is on

        def start(mode: str):
            timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S))
            return wandb.init(project=project, entity=entity, name=name, dir=str(run_dir), config=config,
                              mode=mode, id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(silent=True, console="off", init_timeout=timeout))

        try:
            self.run = start(self.mode)
        except Exception as e:  # noqa: BLE001 (wandb's errors share no base class; tracking must not stop training)
            if self.mode != "online":
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            print(f"warning: wandb could not start an online run ({first}): logging offline to {run_dir}/wandb "
                  f"instead (upload it later with `wandb sync`)", file=sys.stderr, flush=True)
            self.mode = "offline"
            self.run = start("offline")
        # Charts use our training step as their x-axis, while wandb's own step counter only ever increases: after
        # a resume or a rollback repeats step numbers, those points are still recorded instead of dropped.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    @property
    def run_id(self) -> Optional[str]:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({**{k: v for k, v in metrics.items() if v is not None and isinstance(v, (int, float))},
                          "step": step})

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb  # startup: wandb adds 0.6 s and starts nothing until a run is on

            self.run.log({key: wandb.Image(str(path)), "step": step})

    def summarize(self, values: dict[str, Any]) -> None:
        """End-of-run numbers (held-out accuracy, ...): the run's summary, not another point on the curves."""
        if self.run is not None:
            self.run.summary.update({k: v for k, v in values.items() if isinstance(v, (int, float))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
