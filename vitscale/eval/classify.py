"""Plain held-out evaluation of a classifier: top-1 accuracy and mean cross-entropy over a shard set.

The trainer's held-out numbers (eval transform, ImageNet normalisation, the one per-batch computation
:func:`vitscale.objectives.supervised.classifier_sums`), under the evaluation's ``Accelerator``: each rank reads its
share, the sums are added.
"""
from __future__ import annotations

import torch
from torch import nn

from vitscale.data.evaluation import build_eval_loader
from vitscale.data.shards import ShardSet
from vitscale.data.transforms import EvalTransform
from vitscale.objectives.supervised import CLASSIFIER_SUMS, classifier_sums
from vitscale.pixels import normalize
from vitscale.eval.features import check_labels


def require_classifier(model: nn.Module, what: str, data_classes: int = 0) -> None:
    """Evaluations of the model's own predictions need a classification head with a logit for every class of the
    data (``data_classes``, 0 = unknown); more logits than classes are fine (a subset of the head's classes)."""
    head = getattr(model, "num_classes", 0) or 0
    if not head:
        raise ValueError(f"{what} needs a classifier, but this checkpoint has no head (an MAE encoder?): "
                         f"fine-tune it first (`vitscale train` with model.init: docs/finetune.md)")
    if data_classes > head:
        raise ValueError(_too_few(what, head, f"the data has {data_classes} classes"))


def _too_few(what: str, head: int, data: str) -> str:
    return (f"{what}: the checkpoint's head has {head} classes but {data}: evaluate it on data labelled "
            f"0..{head - 1}, or fine-tune a head for these classes first")


@torch.no_grad()
def evaluate_classifier(model: nn.Module, shards: ShardSet, accelerator, *, img_size: int,
                        batch_size: int = 256, view: EvalTransform = EvalTransform()) -> dict:
    """``{"val_top1", "val_top5", "val_loss", "val_images"}`` of ``model`` on ``shards`` (all ranks get the
    totals)."""
    was_training = model.training
    model.eval()
    loader = build_eval_loader(shards.urls, batch_size=batch_size, img_size=img_size,
                               rank=accelerator.process_index, world_size=accelerator.num_processes, view=view)
    sums = torch.zeros(len(CLASSIFIER_SUMS) + 1, dtype=torch.float64)  # the sums, then the image count
    for batch in loader:
        check_labels(batch["label"], "evaluation shards")
        head, top = getattr(model, "num_classes", None), int(batch["label"].max())  # the CNN baseline has no count
        if head and top >= head:  # a manifest that under-counts its classes gets here
            raise ValueError(_too_few("evaluation", head, f"the data has label {top}"))
        labels = batch["label"].to(accelerator.device)
        with accelerator.autocast():
            got = classifier_sums(model, normalize(batch["image"], accelerator.device), labels)
        sums += torch.tensor([got[k] for k in CLASSIFIER_SUMS] + [len(labels)], dtype=torch.float64)
    model.train(was_training)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    *totals, count = sums.tolist()
    if count == 0:
        raise ValueError("evaluation shards: no samples read")
    return {**{f"val_{k}": v / count for k, v in zip(CLASSIFIER_SUMS, totals)}, "val_images": int(count)}
