"""The client optimizers besides AdamW: SGD with momentum (the ViT paper's fine-tuning) and LARS (MAE's linear
probe at batch 16384, from timm's library). Parameter groups (weight decay, layer-wise ``lr_scale``) come from
:func:`vitscale.optim.param_groups` for every optimizer alike.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from vitscale.errors import ConfigError
from vitscale.optim import logical_ndim

OPTIMIZERS = ("adamw", "sgd", "lars")


def check_optim(cfg: Any) -> None:
    """Cross-key rules for ``optim.name`` (called by the config checks: one line, nothing written)."""
    name = cfg.optim.name
    if name != "adamw" and cfg.engine.offload_optimizer:
        raise ConfigError(f"engine.offload_optimizer runs DeepSpeed's CPU AdamW: it needs optim.name=adamw, "
                          f"not {name!r}")
    if name == "lars" and (cfg.engine.zero_stage != 0 or cfg.train.precision != "fp32"):
        # ZeRO (and DeepSpeed's bf16 optimizer) hand the optimizer flat slices of many tensors: LARS's per-tensor
        # trust ratio needs whole tensors. A linear probe trains only the head, so this costs nothing.
        raise ConfigError("optim.name=lars needs whole tensors: set engine.zero_stage=0 and train.precision=fp32 "
                          "(the frozen encoder can still be large: only the head has optimizer state)")


def build_optimizer(groups: Iterable[dict], cfg: Any) -> torch.optim.Optimizer:
    """SGD or LARS over ``groups``; the LR is set per step by the engine (``lr * lr_scale``)."""
    groups = list(groups)
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "lars":
        # startup: timm adds 4.4 s to torch's import (measured, 2 cores); only this use needs it
        from timm.optim import Lars

        return Lars(_split_by_ndim(groups), lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay,
                    trust_coeff=0.001)
    raise ValueError(f"unknown optim.name {o.name!r} (choose from {', '.join(OPTIMIZERS)})")


def _split_by_ndim(groups: list[dict]) -> list[dict]:
    """As MAE's LARS: the trust ratio for every parameter of more than one dimension (weights, tokens, position
    table), plain momentum steps for biases and norms. (timm's ratio is the LARS paper's, |w| / (|g| + wd |w|);
    MAE's is |w| / |g + wd w|: the same at weight decay 0, MAE's linear-probe setting.) timm's LARS decides per group (``always_adapt``), so each
    group is split in two with the same options."""
    out = []
    for group in groups:
        for adapt in (True, False):
            params = [p for p in group["params"] if (logical_ndim(p) > 1) == adapt]
            if params:
                out.append({**group, "params": params, "always_adapt": adapt})
    return out
