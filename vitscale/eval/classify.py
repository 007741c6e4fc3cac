"""Plain held-out evaluation of a classifier: top-1 accuracy and mean cross-entropy over a shard set.

The same computation as the trainer's end-of-run ``val_acc`` (eval transform, ImageNet normalisation, argmax of
the logits), under the evaluation's ``Accelerator``: each rank reads its share, the counts are summed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.data.pipeline import build_eval_loader
from vitscale.data.shards import ShardSet
from vitscale.pixels import normalize
from vitscale.eval.features import check_labels


def require_classifier(model: nn.Module, what: str) -> None:
    """Evaluations of the model's own predictions need a classification head."""
    if getattr(model, "num_classes", 0) in (0, None):
        raise ValueError(f"{what} needs a classifier, but this checkpoint has no head (an MAE encoder?): "
                         f"fine-tune it first (`vitscale train` with model.init: docs/finetune.md)")


@torch.no_grad()
def evaluate_classifier(model: nn.Module, shards: ShardSet, accelerator, *, img_size: int,
                        batch_size: int = 256) -> dict:
    """``{"val_acc", "val_loss", "val_images"}`` of ``model`` on ``shards`` (all ranks get the totals)."""
    was_training = model.training
    model.eval()
    loader = build_eval_loader(shards.urls, batch_size=batch_size, img_size=img_size,
                               rank=accelerator.process_index, world_size=accelerator.num_processes)
    correct, loss_sum, count = 0, 0.0, 0
    for batch in loader:
        check_labels(batch["label"], "evaluation shards")
        labels = batch["label"].to(accelerator.device)
        with accelerator.autocast():
            logits = model(normalize(batch["image"], accelerator.device)).float()
        correct += int((logits.argmax(-1) == labels).sum())
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        count += len(labels)
    model.train(was_training)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(torch.tensor([correct, loss_sum, count], dtype=torch.float64,
                                                 device=accelerator.device), reduction="sum").tolist()
        correct, loss_sum, count = int(totals[0]), totals[1], int(totals[2])
    if count == 0:
        raise ValueError("evaluation shards: no samples read")
    return {"val_acc": correct / count, "val_loss": loss_sum / count, "val_images": count}
