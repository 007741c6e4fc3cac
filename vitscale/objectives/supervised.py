"""Supervised classification: cross-entropy on the classifier logits."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.config.schema import Config
from vitscale.errors import ConfigError
from vitscale.models import create_model
from vitscale.models.flops import forward_flops
from vitscale.objectives.base import Objective, model_kwargs


class Supervised(Objective):
    name = "supervised"
    classifies = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        m = cfg.model
        if not m.class_token and m.global_pool == "token":
            raise ConfigError("model.class_token=false leaves no [CLS] token to classify from: set "
                              "model.global_pool=avg")

    def check_data(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError("supervised training needs data.num_classes (not in the shard manifest)")

    def label_classes(self, num_classes: int) -> int:
        return num_classes

    def build_model(self, num_classes: int) -> nn.Module:
        m = self.cfg.model
        model = create_model(m.name, num_classes=num_classes, global_pool=m.global_pool, head_norm=m.head_norm,
                             **model_kwargs(self.cfg))
        model.set_grad_checkpointing(m.grad_checkpointing)
        return model

    def flops_per_image(self, model: nn.Module) -> float:
        return 3 * forward_flops(model)

    def __call__(self, model: Callable, images: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return supervised_step(model, images, labels, label_smoothing=self.cfg.objective.label_smoothing)

    eval_keys = ("acc", "loss")

    def eval_sums(self, model: Callable, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        correct, loss_sum = count_correct(model, images, labels)
        return {"acc": correct, "loss": loss_sum}


def supervised_step(model: Callable, images: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(images)
    if labels.is_floating_point():  # soft targets (data.mixup/cutmix): label smoothing is already in them
        label_smoothing = 0.0
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    with torch.no_grad():  # a tensor, not .item(): a host sync per micro-batch would stall the GPU
        hard = labels.argmax(-1) if labels.is_floating_point() else labels
        acc = (logits.argmax(-1) == hard).float().mean()
    return loss, {"acc": acc}


@torch.no_grad()
def count_correct(model: Callable, images: torch.Tensor, labels: torch.Tensor) -> tuple[int, float]:
    """(correct predictions, summed loss) for held-out evaluation."""
    logits = model(images).float()
    return int((logits.argmax(-1) == labels).sum()), float(F.cross_entropy(logits, labels, reduction="sum"))
