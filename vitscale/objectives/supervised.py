"""Supervised classification: cross-entropy on the classifier logits."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def supervised_step(model: Callable, images: torch.Tensor, labels: torch.Tensor,
                    label_smoothing: float = 0.0, **_) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(images)
    if labels.is_floating_point():  # soft targets (data.mixup/cutmix): label smoothing is already in them
        label_smoothing = 0.0
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    with torch.no_grad():
        hard = labels.argmax(-1) if labels.is_floating_point() else labels
        acc = (logits.argmax(-1) == hard).float().mean().item()
    return loss, {"acc": acc}


@torch.no_grad()
def count_correct(model: Callable, images: torch.Tensor, labels: torch.Tensor) -> tuple[int, float]:
    """(correct predictions, summed loss) for held-out evaluation."""
    logits = model(images).float()
    return int((logits.argmax(-1) == labels).sum()), float(F.cross_entropy(logits, labels, reduction="sum"))
