"""Settings derived from the config and the launch: computed once, here, by every command that trains or plans.

``resolve(cfg, world_size)`` is the one step from a validated config to what a launch of ``world_size`` processes
runs: the per-process batch (derived from ``data.global_batch_size`` when that is set), the global batch and the
peak LR. ``train``, ``bench`` and ``plan`` call it; nothing else recomputes these numbers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from vitscale.config.load import ConfigError
from vitscale.config.schema import Config


def global_batch(cfg: Config, world_size: int) -> int:
    """Samples per optimizer step: data.batch_size x train.grad_accum x world size."""
    return cfg.data.batch_size * cfg.train.grad_accum * world_size


@dataclass(frozen=True)
class Resolved:
    """A launch's settings. ``cfg`` is a copy of the config with ``data.batch_size`` filled in (the one saved with
    the run); the caller's config is never changed."""
    cfg: Config
    world_size: int
    global_batch: int
    peak_lr: float


def resolve(cfg: Config, world_size: int) -> Resolved:
    """``data.global_batch_size``, when set, fixes the global batch whatever the world size: the per-process batch
    is derived from it and must come out whole (else a one-line ConfigError)."""
    cfg = copy.deepcopy(cfg)
    total = cfg.data.global_batch_size
    if total is not None:
        per_step = world_size * cfg.train.grad_accum
        if total % per_step:
            raise ConfigError(f"data.global_batch_size={total} is not divisible by {world_size} process(es) x "
                              f"train.grad_accum={cfg.train.grad_accum} = {per_step}")
        cfg.data.batch_size = total // per_step
    from vitscale.optim import peak_lr  # the LR rule's one home (imported here: config stays free of torch)

    batch = global_batch(cfg, world_size)
    return Resolved(cfg=cfg, world_size=world_size, global_batch=batch,
                    peak_lr=peak_lr(cfg.optim.lr, cfg.optim.blr, batch))
