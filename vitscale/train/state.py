"""The trainer's small pieces of state and the checks made before a run starts (nothing here trains)."""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from vitscale.config import Config, ConfigError, config_to_dict


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


class Preemption:
    """SIGTERM/SIGUSR1 (Slurm's warning signals) ask for a checkpoint at the next step boundary."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.requested = True


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# Keys that change the model's architecture or what it learns: a checkpoint written under other values cannot
# be continued by this config. (Drop-path, checkpointing, LR, steps, data paths ... may change on resume.)
ARCHITECTURE_KEYS = ("model.name", "model.img_size", "model.patch_size", "model.embed_dim", "model.depth",
                     "model.num_heads", "model.global_pool", "model.decoder_embed_dim", "model.decoder_depth",
                     "model.decoder_num_heads", "objective.name", "data.num_classes")


def check_resumable(saved_config: dict[str, Any], cfg: Config, path: Path) -> None:
    """Refuse a checkpoint written for another model, naming every key that differs."""
    now = config_to_dict(cfg)
    diffs = []
    for key in ARCHITECTURE_KEYS:
        section, name = key.split(".")
        old, new = saved_config.get(section, {}).get(name), now[section][name]
        if old != new:
            diffs.append(f"{key}={old!r} there, {new!r} here")
    if diffs:
        raise ConfigError(f"checkpoint {path} was written for another model ({'; '.join(diffs)}): use a new "
                          f"run.name to start fresh, or train.resume=never")


def apply_global_batch(cfg: Config, world_size: int) -> None:
    """data.global_batch_size, when set, fixes the global batch whatever the world size: the per-GPU batch is
    derived from it, and must come out whole."""
    total = cfg.data.global_batch_size
    if total is None:
        return
    per_step = world_size * cfg.train.grad_accum
    if total % per_step:
        raise ConfigError(f"data.global_batch_size={total} is not divisible by {world_size} process(es) x "
                          f"train.grad_accum={cfg.train.grad_accum} = {per_step}")
    cfg.data.batch_size = total // per_step
