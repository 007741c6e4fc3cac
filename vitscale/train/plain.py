"""The engine surface ``Trainer.step`` drives, over a plain PyTorch model and AdamW in one process (no DeepSpeed).

``vitscale bench --what model`` runs our model and timm's through the trainer's own step with it, so the two are
compared on exactly what training does per step (normalisation, the objective, the non-finite check, backward,
clipping, AdamW) without ZeRO's flat buffers in the way. Precision is autocast in ``train.precision`` around the
model's forward (DeepSpeed's bf16 keeps bf16 weights instead); fp16 adds a gradient scaler.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from vitscale.config.schema import Config
from vitscale.optim import param_groups

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class PlainEngine:
    """What ``Trainer.step`` calls on ``distributed.engine.Engine`` (``device``, ``dtype``, ``__call__``,
    ``backward``, ``step``, ``set_lr``, ``train``/``eval``), for ``model`` moved to ``device``."""

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device):
        self.module = model.to(device).train()
        self.device = device
        self.dtype = torch.float32  # images stay fp32; autocast picks each op's precision
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay),
                                           lr=1e-5, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay, **fused)
        self.amp = AUTOCAST[cfg.train.precision]
        self.scaler: Optional[torch.amp.GradScaler] = \
            torch.amp.GradScaler(device.type) if self.amp is torch.float16 else None
        self.clip = cfg.optim.grad_clip  # as DeepSpeed's gradient_clipping
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
