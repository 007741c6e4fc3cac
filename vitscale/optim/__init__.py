"""Parameter groups and learning-rate schedule (pure functions of the model and the step)."""
from __future__ import annotations

import math
import re
from typing import Optional

import torch


def logical_ndim(param: torch.nn.Parameter) -> int:
    """The parameter's real number of dimensions. Under ZeRO-3 (zero.Init) the tensor itself is a flat, often
    empty, placeholder for this rank's partition; DeepSpeed keeps the real shape in ``ds_shape``."""
    return len(getattr(param, "ds_shape", param.shape))


def _no_decay(name: str, param: torch.nn.Parameter, skip: set[str]) -> bool:
    # Norm weights, biases, position embeddings and special tokens are 1-D or named: decaying them hurts.
    return (logical_ndim(param) <= 1 or name.endswith(".bias")
            or any(name == s or name.endswith("." + s) for s in skip))


def _layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for block i, num_layers+1 for the final norm/head (and the MAE decoder)."""
    if re.match(r"(encoder\.)?(cls_token|pos_embed|patch_embed|reg_token)", name):
        return 0
    m = re.match(r"(encoder\.)?blocks\.(\d+)\.", name)
    if m:
        return int(m.group(2)) + 1
    return num_layers + 1


def _no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Every ``no_weight_decay()`` name of the model and of its submodules, under their prefixes: a wrapper (an
    objective's model around a ViT ``encoder``) need not repeat its encoder's position table and tokens, which
    otherwise were silently decayed."""
    skip: set[str] = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            skip |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return skip


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 num_layers: Optional[int] = None) -> list[dict]:
    """AdamW groups: no decay on norms/biases/pos/tokens; optional layer-wise LR decay via `lr_scale`."""
    skip = _no_weight_decay_names(model)
    if num_layers is None:
        blocks = getattr(model, "blocks", None) or getattr(getattr(model, "encoder", None), "blocks", [])
        num_layers = len(blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not _no_decay(name, p, skip)
        layer = _layer_id(name, num_layers) if layer_decay != 1.0 else 0
        key = (layer, decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer) if layer_decay != 1.0 else 1.0
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def group_layout(groups: list[dict]) -> list[int]:
    """Each parameter group's size in elements (a ZeRO-3 parameter's whole size, not its shard): what a checkpoint's
    optimizer state is laid out by. Two layouts that differ cannot load into each other (checked at resume)."""
    return [sum(int(getattr(p, "ds_numel", p.numel())) for p in g["params"]) for g in groups]


SCHEDULES = ("cosine", "linear")


def lr_at(step: int, peak: float, warmup: int, total: int, min_lr: float = 0.0, schedule: str = "cosine") -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine (or linear) decay to `min_lr` at `total`. `step` is
    0-based."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(1, total - warmup), 1.0)
    if schedule == "linear":
        return min_lr + (peak - min_lr) * (1.0 - progress)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_lr(lr: Optional[float], blr: float, global_batch: int) -> float:
    """Explicit `optim.lr`, else the MAE-paper scaling rule lr = blr * global_batch / 256."""
    return lr if lr is not None else blr * global_batch / 256
