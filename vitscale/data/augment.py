"""The fine-tuning recipes' augmentations, from timm's library (not re-implemented): RandAugment per sample,
RandomErasing and Mixup/CutMix per batch, with the soft targets (label smoothing folded in) the loss then takes.

Every draw is seeded from the data stream, never from the global RNGs: RandAugment from the sample's own augmentation
generator (the one its crop comes from), Mixup/CutMix and RandomErasing from the batch's stream position (rank,
worker, and each source's epoch, block and offset). The libraries draw from Python's ``random``, NumPy's and torch's global generators, so
each call runs with those seeded and afterwards restored: training randomness is untouched and a resumed run
augments exactly as the uninterrupted one.

Order, as timm's training transform: crop + flip -> RandAugment (uint8 image) -> normalise -> RandomErasing ->
Mixup/CutMix (batch).
"""
from __future__ import annotations

import contextlib
import random
from functools import lru_cache
from typing import Any, Optional

import numpy as np
import torch

from vitscale.data.order import seed_of  # the one seed mixer (the stream's order uses it too)
from vitscale.errors import ConfigError
from vitscale.pixels import IMAGENET_MEAN


@contextlib.contextmanager
def seeded(seed: int, devices: tuple = (), torch_too: bool = True):
    """Python's ``random``, NumPy's and (``torch_too``) torch's global generators seeded with ``seed`` for the
    block, then restored. torch's seeding reaches every CUDA generator, so ``devices`` must list each CUDA device
    the block may touch (fork_rng restores only those): ``torch_too=False`` where the block draws from torch not
    at all."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(devices), enabled=torch_too):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if torch_too:
            torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# ----- per sample: RandAugment ----------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def randaug_transform(config: str, img_size: int, interpolation: str = "bilinear"):
    """timm's RandAugment with the hyper-parameters timm's ``create_transform`` gives it for this image size."""
    # startup: timm adds 4.4 s to torch's import (measured, 2 cores); only this use needs it
    from timm.data import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    hparams = dict(translate_const=int(img_size * 0.45), interpolation=str_to_pil_interp(interpolation),
                   img_mean=tuple(min(255, round(255 * x)) for x in IMAGENET_MEAN))
    return rand_augment_transform(config, hparams)


def check_randaug(config: str) -> None:
    """A bad ``data.randaug`` string is a one-line ConfigError before anything runs."""
    if not config:
        return
    if not config.startswith("rand"):
        raise ConfigError(f"data.randaug={config!r}: expected a timm RandAugment string such as "
                          f"'rand-m9-mstd0.5-inc1' (or '' for none)")
    try:
        randaug_transform(config, 224)
    except Exception as e:  # timm raises assorted errors for malformed strings
        raise ConfigError(f"data.randaug={config!r} is not a valid RandAugment string ({e})") from None


def randaugment(img: torch.Tensor, config: str, seed: int, interpolation: str = "bilinear") -> torch.Tensor:
    """RandAugment a uint8 (3,H,W) image (on any device; the library works on PIL images on the CPU)."""
    from torchvision.transforms.v2 import functional as TF

    pil = TF.to_pil_image(img.cpu())
    # timm's RandAugment draws from random and NumPy only. In the trainer (data.decode_on=device) torch's seeding
    # would also reseed the CUDA generators that dropout, drop path and MAE's masks draw from, and leave them so.
    with seeded(seed, torch_too=False):
        out = randaug_transform(config, max(img.shape[-2:]), interpolation)(pil)
    return TF.pil_to_tensor(out).to(img.device)


# ----- per batch: RandomErasing, Mixup/CutMix ---------------------------------------------------------------------
class BatchAugment:
    """RandomErasing and Mixup/CutMix on a normalised batch; labels become soft targets when Mixup/CutMix is on."""

    def __init__(self, data_cfg: Any, num_classes: int, label_smoothing: float, seed: int, rank: int):
        self.seed, self.rank = seed, rank
        self.erase = self.mixup = None
        if data_cfg.random_erasing > 0:
            # startup: timm adds 4.4 s to torch's import (measured, 2 cores); only this use needs it
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(probability=data_cfg.random_erasing, mode="pixel", max_count=1,
                                       device="cpu")
        if data_cfg.mixup > 0 or data_cfg.cutmix > 0:
            # startup: timm adds 4.4 s to torch's import (measured, 2 cores); only this use needs it
            from timm.data import Mixup

            if data_cfg.batch_size % 2:
                raise ConfigError(f"data.mixup/data.cutmix need an even data.batch_size, got {data_cfg.batch_size}")
            self.mixup = Mixup(mixup_alpha=data_cfg.mixup, cutmix_alpha=data_cfg.cutmix, prob=data_cfg.mixup_prob,
                               switch_prob=data_cfg.mixup_switch_prob, mode="batch",
                               label_smoothing=label_smoothing, num_classes=num_classes)

    @property
    def active(self) -> bool:
        return self.erase is not None or self.mixup is not None

    def batch_seed(self, stream: Optional[dict]) -> int:
        """From the batch's stream position: the worker and where it is in each source (epoch, block, offset: only
        ever increasing, so no two batches of a worker share a seed). Synthetic batches (``vitscale bench``) have
        none."""
        s = stream or {}
        where = [s.get("worker", 0)]
        for source in s.get("sources", [s]):  # a mix: every source's position; else the one stream's
            where += [source.get(k, 0) for k in ("epoch", "item", "offset")]
        return seed_of("batch-aug", self.seed, self.rank, *where)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, stream: Optional[dict]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active:
            return images, labels
        devices = (images.device,) if images.device.type == "cuda" else ()
        with seeded(self.batch_seed(stream), devices):
            if self.erase is not None:
                self.erase.device = images.device
                images = self.erase(images)
            if self.mixup is not None:
                images, labels = self.mixup(images, labels)
        return images, labels


def batch_augment_from_config(cfg: Any, num_classes: int, rank: int, classifier: bool) -> BatchAugment:
    """The run's batch augmentation (checks the keys first: a bad value is one line before anything is written);
    ``classifier``: the objective trains a classifier (``Objective.classifies``)."""
    d = cfg.data
    check_randaug(d.randaug)
    if (d.mixup > 0 or d.cutmix > 0 or d.random_erasing > 0 or d.randaug) and not classifier:
        raise ConfigError("data.randaug/mixup/cutmix/random_erasing are fine-tuning augmentations: they need "
                          "objective.name=supervised")
    return BatchAugment(d, num_classes, cfg.objective.label_smoothing, cfg.run.seed, rank)
