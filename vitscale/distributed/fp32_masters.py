"""The fp32 master weights of a ZeRO-0 bf16 run, by parameter name (from a checkpoint) or by parameter (training).

At ZeRO-0 with bf16 DeepSpeed keeps the fp32 masters in the rank-0 model-states file, as
``optimizer["fp32_groups"]``: one list of tensors per optimizer group, with no names. The file's ``module`` holds
the bf16 copies the model trains with, so exporting ``module`` loses the low 16 bits of every weight.

The names are recovered from two facts: the optimizer's groups list parameters in ``named_parameters`` order
(:func:`vitscale.optim.param_groups` appends them as it walks the model), and after every step each bf16 weight
is its master rounded to bf16. So each group's tensors are matched, in order, to the next unused name of the same
shape whose bf16 value is the master's rounding. A checkpoint where that does not hold for every master gives
None and the caller keeps the bf16 weights.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


def masters_by_name(module: dict[str, torch.Tensor], optimizer: Any) -> Optional[dict[str, torch.Tensor]]:
    """``module`` with each trained weight replaced by its fp32 master, or None when the file holds no masters
    (not bf16, or not ZeRO-0) or they cannot be matched to names one to one."""
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if not groups or any(p.dtype != torch.bfloat16 for p in module.values() if torch.is_tensor(p)
                         and p.is_floating_point() and p.dim() > 0):
        return None
    names = [n for n, p in module.items() if torch.is_tensor(p)]
    out, used = dict(module), set()
    for group in groups:
        start = 0
        for master in group:
            at = _next_match(module, names, used, start, master)
            if at is None:
                return None
            used.add(names[at])
            out[names[at]] = master.detach().float()
            start = at + 1
    return out


def _next_match(module: dict, names: list[str], used: set, start: int, master: torch.Tensor) -> Optional[int]:
    rounded = None
    for i in range(start, len(names)):
        name = names[i]
        weight = module[name]
        if name in used or weight.shape != master.shape:
            continue
        rounded = master.to(torch.bfloat16) if rounded is None else rounded
        if torch.equal(weight, rounded):
            return i
    return None


def unfused_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """While training at ZeRO-0 in bf16: ``id(bf16 parameter) -> its fp32 master``, from DeepSpeed's unfused
    mixed-precision optimizer (parallel lists ``fp16_groups`` / ``fp32_groups``, the bf16 run's as well); {} for
    any other optimizer (ZeRO's link their masters to the parameters themselves)."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not isinstance(low, list) or not isinstance(high, list) or len(low) != len(high):
        return {}
    out = {}
    for params, masters in zip(low, high):
        if not isinstance(masters, list) or len(params) != len(masters):
            return {}
        out.update({id(p): m for p, m in zip(params, masters) if m.shape == p.shape})
    return out
