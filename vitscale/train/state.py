"""The training loop's small pieces of state (nothing here trains)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class TrainState:
    """What a checkpoint must carry beyond weights and optimizer shards (saved in trainer_state.json)."""
    step: int = 0
    samples: int = 0
    tracker_id: Optional[str] = None
    history: list = field(default_factory=list)  # launches: [start step, world size]
    lr_scale: float = 1.0  # lowered by each rollback after non-finite losses, for the rest of the run
    nonfinite_losses: int = 0  # micro-batches skipped because some rank's loss was NaN/Inf
    rollbacks: int = 0
    step_s: float = 0.0  # wall time of the last optimizer step (+ the checkpoint write: the preemption budget)

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainState":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in saved.items() if k in known})


@dataclass
class Window:
    """Time, data wait and steps since the last metrics line."""
    start: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    steps: int = 0


@dataclass
class StepOutput:
    """What one optimizer step hands back: per micro-batch losses and objective metrics (device tensors, read on
    log steps only), the last micro-batch (for pictures) and whether any rank asked to stop (preemption)."""
    losses: list
    metrics: list
    batch: dict
    preempted: bool = False


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
