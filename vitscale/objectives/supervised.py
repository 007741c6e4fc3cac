"""Supervised classification: cross-entropy on the classifier logits."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.config.schema import Config
from vitscale.errors import ConfigError
from vitscale.models import create_model
from vitscale.models.flops import train_flops, unwrap, vit_flop_parts
from vitscale.objectives.base import Objective, model_kwargs


CLASSIFIER_SUMS = ("top1", "top5", "loss")  # what a held-out classifier evaluation sums: val_top1, val_top5, val_loss


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
                             representation_size=m.representation_size, **model_kwargs(self.cfg))
        model.set_grad_checkpointing(m.grad_checkpointing)
        return model

    def flops_per_image(self, model: nn.Module) -> float:
        vit = unwrap(model)  # frozen parts (model.freeze) have no backward
        return float(train_flops(vit, vit_flop_parts(vit, vit.patch_embed.img_size)))

    def __call__(self, model: Callable, images: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return supervised_step(model, images, labels, label_smoothing=self.cfg.objective.label_smoothing)

    eval_keys = CLASSIFIER_SUMS

    def eval_sums(self, model: Callable, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return classifier_sums(model, images, labels)


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
def classifier_sums(model: Callable, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The one held-out classifier computation (end-of-run, periodic validation, ``vitscale eval accuracy``): the
    batch's correct top-1 and top-5 predictions and summed cross-entropy (fp32 logits), keyed by CLASSIFIER_SUMS."""
    logits = model(images).float()
    topk = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = topk == labels[:, None]
    return {"top1": float(hits[:, 0].sum()), "top5": float(hits.any(dim=-1).sum()),
            "loss": float(F.cross_entropy(logits, labels, reduction="sum"))}
