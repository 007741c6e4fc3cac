"""One logical worker's stream of a single shard set: what it reads, in which order, and where it is.

The order and the position are described in :mod:`vitscale.data.pipeline` (the loader the trainer uses) and
:mod:`vitscale.data.order`; a mix of several sources (:mod:`vitscale.data.mix`) runs one of these per source.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from vitscale.data.batch_ring import Ring
from vitscale.data.order import Cut, EpochPlan, Order, block_shards, block_stream, epoch_plan, generator, slot_index
from vitscale.data.reduced_decode import train_image
from vitscale.data.resume import fresh_position as _fresh_position
from vitscale.data.resume import position as _position
from vitscale.data.tario import ShardError, label_ext, sample_image, sample_label
from vitscale.data.transforms import DEFAULT_MAX_PIXELS, DeferredJpeg, decode, jpeg_size, train_crop, train_transform
from vitscale.errors import DataError

log = logging.getLogger("vitscale.data")

# data.max_bad_fraction is judged against at least this many samples, so a few bad files met early in a healthy
# data set (2 in the first 100 at a 0.5% rate) do not stop a run; a data set that is mostly bad still stops fast.
MIN_SEEN_FOR_BAD_CHECK = 1000


@dataclass(frozen=True)
class StreamPlan:
    urls: tuple
    order: Order
    rank: int
    world_size: int
    num_workers: int  # logical workers per rank (>= 1)
    batch_size: int
    img_size: int
    crop_min_scale: float
    max_bad_fraction: float
    decode_on: str = "worker"  # "device": JPEGs go to the trainer undecoded, with their crop drawn (see transforms)
    label_key: str = "cls"
    num_classes: int = 0  # > 0: supervised, a sample without a label in [0, num_classes) is skipped and counted
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
    randaug: str = ""  # timm RandAugment config, applied after the crop (data.randaug; see data/augment.py)
    interpolation: str = "bilinear"  # of every resize (data.interpolation)
    reduced_decode: bool = True  # JPEGs whose crop is >= 3x the output decode at 1/2-1/8 size (reduced_decode.py)
    cut: Cut = Cut(1)  # of epochs not in ``plans`` (order.block_layout, or a saved state's)
    plans: dict = field(default_factory=dict)  # {epoch: EpochPlan} of epochs split by an elastic resume

    @property
    def slots(self) -> int:
        return self.world_size * self.num_workers


# ----- one worker's stream --------------------------------------------------------------------------------------
class WorkerStream:
    """Forever: ``(key, image uint8 (3,S,S) | DeferredJpeg | None, label, position_after)`` for one logical worker
    from ``position``. Bad samples and damaged shards are skipped, warned about (shard url and key) and counted."""

    def __init__(self, plan: StreamPlan, worker: int, position: Optional[dict] = None, decode_images: bool = True):
        self.plan, self.worker, self.decode_images = plan, worker, decode_images
        self.slot = slot_index(plan.rank, plan.world_size, worker)
        self.label_ext = label_ext(plan.label_key)
        pos = _position(position or _fresh_position())
        self.epoch, self.item, self.offset = pos["epoch"], pos["item"], pos["offset"]
        self.seen, self.skipped, self.bad_shards = pos["seen"], pos["skipped"], pos["bad_shards"]
        self.where = f"rank {plan.rank} worker {worker}"
        self.fruitless: set[int] = set()  # shards of this worker's whole epochs in a row that gave no sample

    def position(self) -> dict:
        return {"epoch": self.epoch, "item": self.item, "offset": self.offset, "seen": self.seen,
                "skipped": self.skipped, "bad_shards": self.bad_shards}

    def __iter__(self) -> Iterator[tuple]:
        p = self.plan
        while True:
            plan = epoch_plan(p.plans, p.order, p.cut, self.epoch)
            mine = plan.items[self.slot::p.slots]
            whole = self.item == 0 and self.offset == 0 and bool(mine) and all(s == 0 for _, s in mine)
            produced = False
            while self.item < len(mine):
                block, start = mine[self.item]
                for out in self._read_item(plan, block, start):
                    produced = True
                    yield out
                self.item, self.offset = self.item + 1, 0
            self._note_fruitless(plan, mine, whole and not produced)
            self.epoch, self.item, self.offset = self.epoch + 1, 0, 0

    def _note_fruitless(self, plan: EpochPlan, mine: list, fruitless: bool) -> None:
        """Stop a worker that would loop forever without a sample: once its whole epochs in a row that gave nothing
        have covered every shard. One damaged or empty shard only costs the worker that epoch: the next epoch
        deals it other shards (shuffled, or the unshuffled order's rotation)."""
        if not fruitless:
            self.fruitless.clear()
            return
        self.fruitless.update(i for block, _ in mine
                              for i in block_shards(self.plan.order, self.epoch, plan.cut, block))
        if len(self.fruitless) >= self.plan.order.num_shards:
            raise DataError(f"data {self.where} read no valid sample from any of the {len(self.fruitless)} shards "
                            f"in its last epochs (each damaged, empty or without an image), e.g. {self.plan.urls[0]}")

    def _read_item(self, plan: EpochPlan, block: int, start: int) -> Iterator[tuple]:
        """The block's entries from ``start + offset`` on; those before are read but not decoded."""
        skip = start + self.offset
        for j, entry in enumerate(block_stream(self.plan.urls, self.plan.order, self.epoch, plan.cut, block,
                                               self.label_ext)):
            if j < skip:
                continue
            self.offset = j + 1 - start
            if isinstance(entry, ShardError):
                self._bad(f"skipping the rest of shard {entry.url} ({entry.read} samples read): {entry.message}",
                          shard=True)
                continue
            self.seen += 1
            try:
                img, label = self._sample(entry, plan.cut.k, block, j)
            except Exception as e:
                self._bad(f"skipping bad sample {entry['__key__']} in {entry['__url__']}: {e}")
                continue
            yield entry["__key__"], img, label, self.position()
            self._check()

    def _sample(self, sample: dict, k: int, block: int, j: int) -> tuple:
        p = self.plan
        data = sample_image(sample)
        label = self._label(sample)
        if not self.decode_images:
            return None, label
        g = generator("aug", p.order.seed, self.epoch, k, block, j)
        size = jpeg_size(data, p.max_pixels) if p.decode_on == "device" else None
        if size is not None:  # the same draws from g as below: the same crop either way
            crop = train_crop(*size, p.img_size, g, p.crop_min_scale, randaug=p.randaug, interpolation=p.interpolation)
            return DeferredJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), crop), label
        if p.reduced_decode:
            image = train_image(data, p.img_size, g, p.crop_min_scale, randaug=p.randaug, max_pixels=p.max_pixels,
                                interpolation=p.interpolation)
        else:
            image = train_transform(decode(data, p.max_pixels), p.img_size, g, p.crop_min_scale, randaug=p.randaug,
                                    interpolation=p.interpolation)
        return image, label

    def _label(self, sample: dict) -> int:
        n = self.plan.num_classes
        if not n:  # not supervised: the label is carried along, a bad one is not worth a sample
            try:
                label = sample_label(sample, self.plan.label_key)
            except ValueError:
                label = None
            return -1 if label is None else label
        label = sample_label(sample, self.plan.label_key)
        if label is None:
            raise ValueError(f"no label (data.label_key={self.plan.label_key})")
        if not 0 <= label < n:
            raise ValueError(f"label {label} is outside 0..{n - 1} (data.num_classes={n})")
        return label

    def _bad(self, message: str, shard: bool = False) -> None:
        self.seen += shard  # a damaged shard counts as one bad entry
        self.skipped += 1
        self.bad_shards += shard
        log.warning("vitscale.data: %s", message)
        self._check()

    def _check(self) -> None:
        frac = self.plan.max_bad_fraction
        if self.skipped > frac * max(self.seen, MIN_SEEN_FOR_BAD_CHECK):
            raise DataError(f"too many bad samples: {self.skipped} of {self.seen} skipped by data {self.where} "
                            f"(more than data.max_bad_fraction={frac}); check the shards (vitscale check-shards)")


def collate_batch(items: list, worker: int, ring: Optional[Ring] = None) -> dict:
    keys, imgs, labels, pos = zip(*items)
    batch = {"label": torch.tensor(labels, dtype=torch.int64), "key": list(keys),
             "stream": {"worker": worker, **pos[-1]}}
    if not all(torch.is_tensor(x) for x in imgs):
        batch["image"] = list(imgs)  # deferred JPEGs: see materialize
    elif ring is not None:  # a DataLoader worker: straight into (reused) shared memory
        batch["image"], batch["ring_seq"] = ring.stack(imgs)
    else:
        batch["image"] = torch.stack(imgs)
    return batch


def iter_worker_batches(plan: StreamPlan, worker: int, position: Optional[dict] = None,
                        ring: Optional[Ring] = None) -> Iterator[dict]:
    buf = []
    for item in WorkerStream(plan, worker, position):
        buf.append(item)
        if len(buf) == plan.batch_size:
            yield collate_batch(buf, worker, ring)
            buf = []
