"""Supervised classification: cross-entropy on the classifier logits."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def supervised_step(model: Callable, images: torch.Tensor, labels: torch.Tensor,
                    label_smoothing: float = 0.0, **_) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    with torch.no_grad():
        acc = (logits.argmax(-1) == labels).float().mean().item()
    return loss, {"acc": acc}


@torch.no_grad()
def count_correct(model: Callable, images: torch.Tensor, labels: torch.Tensor) -> tuple[int, float]:
    """(correct predictions, summed loss) for held-out evaluation."""
    logits = model(images).float()
    return int((logits.argmax(-1) == labels).sum()), float(F.cross_entropy(logits, labels, reduction="sum"))
