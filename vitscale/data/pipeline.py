"""Streaming WebDataset loader: mixed across shards, bounded memory, exact and elastic resume.

Order (see :mod:`vitscale.data.order`). Each epoch's global order is a pure function of ``(seed, epoch)`` and the
shards: blocks of ``data.shards_in_flight`` shards, each block's samples interleaved through a seeded buffer of
``data.shuffle_buffer`` samples. A rank runs ``W = max(num_workers, 1)`` logical workers; the blocks are dealt
round-robin to the ``world_size * W`` reader slots. Each worker runs its epochs one after another forever
("per-worker resampled epochs"): no rank waits for another and none runs dry. Sample ``j`` of a block is augmented
with an RNG seeded from ``(seed, epoch, block, j)``: the same pixels on any number of processes or workers.

Memory. A worker holds its open shards' current sample and the buffer, never a whole shard: tar members are
streamed (plain or gzip), and only image and label members are read (others, e.g. pickles, are skipped unread).
Batches reach the trainer through a small ring of shared-memory buffers per worker, reused once the trainer has
dropped a batch (:mod:`vitscale.data.batch_ring`).

Position. A worker's position is ``(epoch, item, offset)`` = the next entry it would read, plus cumulative
``seen``/``skipped``/``bad_shards`` counters. Every batch carries its worker's position after its last sample;
the :class:`TrainLoader` stores it per logical worker when the batch is handed to the caller, so ``state_dict()``
is exact for what the trainer consumed, however much the DataLoader prefetched. DataLoader visits workers
round-robin from worker 0 on each new iterator, so after ``k`` consumed batches physical worker ``i`` plays logical
worker ``(i + k) % W``. On resume a worker re-reads only its current block, skipping (undecoded) to its offset.
Resuming with every rank's state on another world size or worker count deals what is left of the epochs in
progress to the new slots (:func:`vitscale.data.order.elastic_plans`): nothing repeated, nothing skipped.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitscale import faults
from vitscale.data import worker_death
from vitscale.data.batch_ring import Releases, Ring
from vitscale.data.evaluation import worker_init
from vitscale.data.order import (Order, block_size, block_stream, epoch_plan, generator, plans_from_json,
                                 plans_to_json, slot_index)
from vitscale.data.resume import COUNTERS, STATE_VERSION, merge_states, not_elastic
from vitscale.data.resume import fresh_position as _fresh_position
from vitscale.data.resume import position as _position
from vitscale.data.tario import ShardError, label_ext, sample_image, sample_label
from vitscale.data.reduced_decode import train_image
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
    reduced_decode: bool = True  # JPEGs whose crop is >= 6x the output decode at 1/4-1/8 size (reduced_decode.py)
    k: int = 1  # shards per block for epochs not in ``plans``
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

    def position(self) -> dict:
        return {"epoch": self.epoch, "item": self.item, "offset": self.offset, "seen": self.seen,
                "skipped": self.skipped, "bad_shards": self.bad_shards}

    def __iter__(self) -> Iterator[tuple]:
        p = self.plan
        while True:
            plan = epoch_plan(p.plans, p.order, p.k, self.epoch)
            mine = plan.items[self.slot::p.slots]
            whole = self.item == 0 and self.offset == 0 and bool(mine) and all(s == 0 for _, s in mine)
            produced = False
            while self.item < len(mine):
                block, start = mine[self.item]
                for out in self._read_item(plan.k, block, start):
                    produced = True
                    yield out
                self.item, self.offset = self.item + 1, 0
            if whole and not produced:  # looping on would hang the run without a word
                raise DataError(f"data {self.where} read no valid sample in epoch {self.epoch} from its "
                                f"{len(mine)} block(s) of shards, e.g. {p.urls[0]}")
            self.epoch, self.item, self.offset = self.epoch + 1, 0, 0

    def _read_item(self, k: int, block: int, start: int) -> Iterator[tuple]:
        """The block's entries from ``start + offset`` on; those before are read but not decoded."""
        skip = start + self.offset
        for j, entry in enumerate(block_stream(self.plan.urls, self.plan.order, self.epoch, k, block,
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
                img, label = self._sample(entry, k, block, j)
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
            crop = train_crop(*size, p.img_size, g, p.crop_min_scale, randaug=p.randaug)
            return DeferredJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), crop), label
        if p.reduced_decode:
            image = train_image(data, p.img_size, g, p.crop_min_scale, randaug=p.randaug, max_pixels=p.max_pixels)
        else:
            image = train_transform(decode(data, p.max_pixels), p.img_size, g, p.crop_min_scale, randaug=p.randaug)
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


def _collate(items: list, worker: int, ring: Optional[Ring] = None) -> dict:
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
            yield _collate(buf, worker, ring)
            buf = []


class _TrainStream(IterableDataset):
    def __init__(self, plan: StreamPlan, positions: list[dict], consumed: int, released: torch.Tensor):
        self.plan, self.positions, self.consumed, self.released = plan, positions, consumed, released

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.consumed) % self.plan.num_workers
        if info is None:  # in the trainer's process: nothing to hand over through shared memory
            return iter_worker_batches(self.plan, worker, self.positions[worker])
        batches = iter_worker_batches(self.plan, worker, self.positions[worker], Ring(self.released, worker))
        return _fault_point(batches, self.plan.rank, physical)


def _fault_point(batches: Iterator[dict], rank: int, worker: int) -> Iterator[dict]:
    """A DataLoader worker's batches, with the ``kill@worker`` fault point (see vitscale/faults.py)."""
    for n, batch in enumerate(batches, 1):
        faults.inject("worker", rank=rank, batch=n, worker=worker)
        yield batch


# ----- the loader the trainer uses -----------------------------------------------------------------------------
class TrainLoader:
    """Infinite iterable of batches with an exact ``state_dict()`` (see the module docstring).

    Batches: ``image`` uint8 (B,3,S,S), ``label`` int64 (B,) (-1 = no label), ``key`` list[str], ``stream``
    ``{worker, **position}`` (the worker's position after its last sample, see ``POSITION_KEYS``). Use one
    iterator at a time; ``iter()`` again continues from the last batch handed out.
    """

    def __init__(self, plan: StreamPlan, num_workers: int, state: Union[dict, list, None] = None):
        self.plan, self.num_workers = plan, num_workers
        self.positions = [_fresh_position() for _ in range(plan.num_workers)]
        self.batches = 0
        self.carried = {c: 0 for c in COUNTERS}  # counters of an earlier layout (rank 0 reports them)
        if state:
            self.load_state_dict(state)

    def _layout(self) -> dict:
        p = self.plan
        return {**p.order.as_dict(), "rank": p.rank, "world_size": p.world_size, "num_workers": p.num_workers}

    def state_dict(self) -> dict:
        """Plain JSON-serialisable dict: the order and layout, ``batches`` consumed, ``workers`` = one position
        (``POSITION_KEYS``) per logical worker, the epochs an elastic resume split (``plans``), and ``carried``
        counters. Give every rank's dict back (a list) to resume on another world size or worker count."""
        first = min(w["epoch"] for w in self.positions)
        plans = {e: p for e, p in self.plan.plans.items() if e >= first}
        return {"version": STATE_VERSION, **self._layout(), "k": self.plan.k, "plans": plans_to_json(plans),
                "batches": self.batches, "workers": copy.deepcopy(self.positions), "carried": dict(self.carried)}

    def skipped(self) -> tuple[int, int]:
        """(bad samples, damaged shards) this rank's stream skipped so far, over all its workers."""
        shards = sum(w["bad_shards"] for w in self.positions) + self.carried["bad_shards"]
        return sum(w["skipped"] for w in self.positions) + self.carried["skipped"] - shards, shards

    def load_state_dict(self, state: Union[dict, list]) -> None:
        """Resume from this rank's ``state_dict()`` (same layout: exact), or from the list of every rank's (any
        layout: the epochs in progress are finished by the new slots, then the order goes on)."""
        states = list(state) if isinstance(state, (list, tuple)) else [state]
        layout = self._layout()
        own = [s for s in states if s.get("version") == STATE_VERSION and s.get("rank") == self.plan.rank and
               {k: s.get(k) for k in layout} == layout and len(s.get("workers") or []) == self.plan.num_workers]
        if own:
            s = own[0]
            self.positions = [_position(w) for w in s["workers"]]
            self.batches = int(s["batches"])
            self.carried = {c: int((s.get("carried") or {}).get(c, 0)) for c in COUNTERS}
            self.plan = dataclasses.replace(self.plan, plans=plans_from_json(s.get("plans")))
            return
        why = not_elastic(states, self.plan.order)
        if why is None:
            self._resume_elastic(states)
            return
        # The order itself changed (other shards, seed or mixing) or the state is from an older version: the epoch
        # in progress cannot be continued; start the next one so recent data is not simply replayed.
        epoch = max((int(w.get("epoch", 0)) for s in states for w in s.get("workers") or []), default=-1) + 1
        log.warning("vitscale.data: the saved data-stream state cannot be continued (%s): starting epoch %d",
                    why, epoch)
        self.positions = [_fresh_position(epoch) for _ in range(self.plan.num_workers)]
        self.batches = 0

    def _resume_elastic(self, states: list[dict]) -> None:
        first, plans, totals = merge_states(states, self.plan.order)
        self.plan = dataclasses.replace(self.plan, plans=plans)
        self.positions = [_fresh_position(first) for _ in range(self.plan.num_workers)]
        self.batches = 0
        self.carried = totals if self.plan.rank == 0 else {c: 0 for c in COUNTERS}
        log.info("vitscale.data: data stream of %d rank(s) x %d worker(s) continued on %d x %d, in epoch %d",
                 states[0]["world_size"], states[0]["num_workers"], self.plan.world_size, self.plan.num_workers,
                 first)

    def __iter__(self) -> Iterator[dict]:
        return _TrainIterator(self)


class _TrainIterator:
    def __init__(self, loader: TrainLoader):
        self.loader = loader
        self.releases = Releases(loader.plan.num_workers)
        dataset = _TrainStream(loader.plan, copy.deepcopy(loader.positions), loader.batches, self.releases.table)
        # Building the DataLoader iterator now (not lazily) and giving it its own generator keeps the global
        # torch RNG untouched, so the trainer's RNG state is the same on every launch.
        dl = DataLoader(dataset, batch_size=None, num_workers=loader.num_workers, persistent_workers=False,
                        pin_memory=torch.cuda.is_available(), worker_init_fn=worker_init,
                        generator=torch.Generator().manual_seed(loader.plan.order.seed))
        self.it = iter(dl)
        if loader.num_workers > 0:
            worker_death.defer_sigchld()  # a dead worker is reported here, at a batch, not mid-save

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        try:
            worker_death.raise_pending(self.it, self.loader.plan.rank)
            batch = next(self.it)
        except RuntimeError as e:
            raise worker_death.explain(e, self.it, self.loader.plan.rank) from None
        loader = self.loader
        s = batch["stream"]
        expected = loader.batches % loader.plan.num_workers
        if s["worker"] != expected:
            raise RuntimeError(f"data stream out of order: batch {loader.batches} came from logical worker "
                               f"{s['worker']}, expected {expected}")
        loader.positions[s["worker"]] = _position(s)
        loader.batches += 1
        if "ring_seq" in batch:
            self.releases.handed_out(s["worker"], batch.pop("ring_seq"), batch["image"])
        return batch


def _check_slots(num_shards: int, world_size: int, num_workers: int) -> None:
    w = max(num_workers, 1)
    if num_shards < world_size * w:
        raise ValueError(f"{num_shards} shards cannot feed {world_size} rank(s) x {w} worker(s) = "
                         f"{world_size * w} readers: write more, smaller shards or lower data.num_workers")


def build_train_loader(urls: Sequence[str], *, batch_size: int, img_size: int, seed: int, rank: int,
                       world_size: int, num_workers: int, shuffle: bool = True, crop_min_scale: float = 0.35,
                       state: Union[dict, list, None] = None, max_bad_fraction: float = 0.01,
                       decode_on: str = "worker", shards_in_flight: int = 16, shuffle_buffer: int = 1000,
                       label_key: str = "cls", num_classes: int = 0,
                       max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, randaug: str = "",
                       reduced_decode: bool = True) -> TrainLoader:
    """Infinite training stream for one rank; ``state`` is a previous ``TrainLoader.state_dict()`` (or the list of
    every rank's, to resume on another layout)."""
    urls = list(urls)
    if not urls:
        raise ValueError("no training shards")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if shards_in_flight < 1 or shuffle_buffer < 0:
        raise ValueError(f"data.shards_in_flight must be >= 1 and data.shuffle_buffer >= 0, got "
                         f"{shards_in_flight} and {shuffle_buffer}")
    label_ext(label_key)  # a bad data.label_key is an error now, not in a worker
    _check_slots(len(urls), world_size, num_workers)
    order = Order(seed=int(seed), num_shards=len(urls), shuffle=bool(shuffle),
                  shards_in_flight=int(shards_in_flight), shuffle_buffer=int(shuffle_buffer))
    workers = max(num_workers, 1)
    plan = StreamPlan(urls=tuple(urls), order=order, rank=rank, world_size=world_size, num_workers=workers,
                      batch_size=batch_size, img_size=img_size, crop_min_scale=float(crop_min_scale),
                      max_bad_fraction=float(max_bad_fraction), decode_on=decode_on, label_key=label_key,
                      num_classes=int(num_classes), max_pixels=max_pixels, k=block_size(order, world_size * workers),
                      randaug=randaug, reduced_decode=reduced_decode)
    return TrainLoader(plan, num_workers, state)


def train_loader_from_config(cfg, urls: Sequence[str], rank: int, world_size: int,
                             state: Union[dict, list, None] = None, num_classes: int = 0) -> TrainLoader:
    """The training stream a run's config (``vitscale.config.Config``) describes, for one rank. ``num_classes``
    > 0 (supervised runs) skips and counts samples without a label in range."""
    d = cfg.data
    return build_train_loader(urls, batch_size=d.batch_size, img_size=cfg.model.img_size, seed=cfg.run.seed,
                              rank=rank, world_size=world_size, num_workers=d.num_workers, shuffle=d.shuffle,
                              crop_min_scale=d.crop_min_scale, max_bad_fraction=d.max_bad_fraction, state=state,
                              decode_on=d.decode_on, shards_in_flight=d.shards_in_flight,
                              shuffle_buffer=d.shuffle_buffer, label_key=d.label_key,
                              num_classes=num_classes,
                              max_pixels=d.max_pixels or None, randaug=d.randaug)
