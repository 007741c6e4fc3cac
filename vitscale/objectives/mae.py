"""Masked-autoencoder pretraining: the model computes its own loss on the masked patches."""
from __future__ import annotations

from typing import Callable

import torch


def mae_step(model: Callable, images: torch.Tensor, labels: torch.Tensor | None = None,
             mask_ratio: float = 0.75, **_) -> tuple[torch.Tensor, dict[str, float]]:
    loss, _pred, mask = model(images, mask_ratio=mask_ratio)
    return loss.float(), {"mask_frac": float(mask.float().mean())}
