"""Settings derived from the config and the launch: computed once, here, by every command that trains or plans.

``resolve(cfg, world_size)`` is the one step from a validated config to what a launch of ``world_size`` processes
runs: the per-process batch (derived from ``data.global_batch_size`` when that is set), the global batch, the
peak LR and the run's length in steps (:func:`run_length`: from ``train.epochs`` / ``optim.warmup_epochs`` and the
training set's sample count when the recipe is in epochs). ``train``, ``bench`` and ``plan`` call it; nothing else
recomputes these numbers.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from vitscale.config.schema import Config
from vitscale.config.sources import describe, is_mix
from vitscale.errors import ConfigError
from vitscale.optim import peak_lr  # the LR rule's one home


def global_batch(cfg: Config, world_size: int) -> int:
    """Samples per optimizer step: data.batch_size x train.grad_accum x world size."""
    return cfg.data.batch_size * cfg.train.grad_accum * world_size


DEFAULT_STEPS = 1000  # train.steps when neither it nor train.epochs is set
DEFAULT_WARMUP_STEPS = 100  # optim.warmup_steps when neither it nor optim.warmup_epochs is set


def _steps(steps: Optional[int]) -> int:
    """train.steps, or the default when it is null (only null: a 0 is refused by the config checks, never 1000)."""
    return DEFAULT_STEPS if steps is None else steps


@dataclass(frozen=True)
class RunLength:
    """``steps`` and ``warmup_steps`` of a run; ``note`` says how they were derived from epochs ("" when the
    config gives steps). ``steps`` is None only when the length is in epochs and the data was not consulted."""
    steps: Optional[int]
    warmup_steps: Optional[int]
    note: str = ""


def epochs_to_steps(epochs: float, samples: int, global_batch: int) -> int:
    """ceil(epochs x samples / global batch): the run sees at least ``epochs`` passes. Exact arithmetic (0.1 epoch of
    1000 samples at batch 100 is 1 step, not 2 through float rounding)."""
    return math.ceil(Fraction(repr(float(epochs))) * samples / global_batch)


def run_length(cfg: Config, global_batch: int, train_samples: Optional[int], need: bool = True) -> RunLength:
    """``train.steps`` and ``optim.warmup_steps``, or derived from ``train.epochs`` / ``optim.warmup_epochs`` with
    ``train_samples`` (the shard manifest's count). ``need=False`` (commands that run no schedule: plan, bench) leaves
    an epoch-given length None instead of asking for the count; ``need=True`` without a count is a ConfigError."""
    t, o = cfg.train, cfg.optim
    if t.epochs is None and o.warmup_epochs is None:
        return RunLength(_steps(t.steps),
                         DEFAULT_WARMUP_STEPS if o.warmup_steps is None else o.warmup_steps)
    # A mix's size is the sum of its sources' (those with a weight > 0): an epoch draws that many samples.
    if train_samples is None or train_samples < 1:
        if not need:
            return RunLength(None if t.epochs is not None else _steps(t.steps),
                             None if o.warmup_epochs is not None else o.warmup_steps)
        key = "train.epochs" if t.epochs is not None else "optim.warmup_epochs"
        which = describe(cfg.data.train_shards)
        whose = "every source needs a manifest" if is_mix(cfg.data.train_shards) else "has no manifest"
        raise ConfigError(f"{key} needs the training set's size, but {which} {whose} with sample counts: give the "
                          f"length in steps (train.steps, optim.warmup_steps) or use a manifest (vitscale "
                          f"make-shards writes one)")
    per = f"{train_samples} samples / global batch {global_batch}"
    steps, warmup, notes = _steps(t.steps), o.warmup_steps, []
    if t.epochs is not None:
        steps = epochs_to_steps(t.epochs, train_samples, global_batch)
        notes.append(f"train.steps={steps} (train.epochs={t.epochs:g} x {per})")
    if o.warmup_epochs is not None:
        warmup = epochs_to_steps(o.warmup_epochs, train_samples, global_batch)
        notes.append(f"optim.warmup_steps={warmup} (optim.warmup_epochs={o.warmup_epochs:g} x {per})")
    return RunLength(steps, DEFAULT_WARMUP_STEPS if warmup is None else warmup, "; ".join(notes))


@dataclass(frozen=True)
class Resolved:
    """A launch's settings. ``cfg`` is a copy of the config with ``data.batch_size``, ``train.steps`` and
    ``optim.warmup_steps`` filled in and the epoch keys they came from cleared (the config saved with the run, so
    it reloads as it ran); the caller's config is never changed. ``length_note`` says how an epoch recipe became
    steps ("" when it was given in steps)."""
    cfg: Config
    world_size: int
    global_batch: int
    peak_lr: float
    length_note: str = ""


def resolve(cfg: Config, world_size: int, train_samples: Optional[int] = None, need_length: bool = True) -> Resolved:
    """``data.global_batch_size``, when set, fixes the global batch whatever the world size: the per-process batch
    is derived from it and must come out whole (else a one-line ConfigError). ``train_samples`` (the training
    set's size) turns a length in epochs into steps (see :func:`run_length`, and ``need_length`` there)."""
    cfg = copy.deepcopy(cfg)
    total = cfg.data.global_batch_size
    if total is not None:
        per_step = world_size * cfg.train.grad_accum
        if total % per_step:
            raise ConfigError(f"data.global_batch_size={total} is not divisible by {world_size} process(es) x "
                              f"train.grad_accum={cfg.train.grad_accum} = {per_step}")
        cfg.data.batch_size = total // per_step
    batch = global_batch(cfg, world_size)
    length = run_length(cfg, batch, train_samples, need_length)
    if length.steps is not None:
        cfg.train.steps, cfg.train.epochs = length.steps, None
    if length.warmup_steps is not None:
        cfg.optim.warmup_steps, cfg.optim.warmup_epochs = length.warmup_steps, None
    cfg.resolved_world_size = world_size  # not a schema field: never saved, so a reloaded config is raw again
    peak = peak_lr(cfg.optim.lr, cfg.optim.blr, batch)
    if cfg.optim.min_lr > peak:  # the decay would raise the LR to it
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr:g} is above the peak LR {peak:g} (optim.lr, or optim.blr x "
                          f"the global batch {batch} / 256): lower it, or raise the LR")
    return Resolved(cfg=cfg, world_size=world_size, global_batch=batch, peak_lr=peak, length_note=length.note)


def resolved_world_size(cfg: Config) -> Optional[int]:
    """The world size ``cfg`` was resolved for (its batch, length and LR are a launch's), or None for a config as
    loaded: a consumer that needs the launch's numbers asks this instead of re-deriving them."""
    return getattr(cfg, "resolved_world_size", None)
