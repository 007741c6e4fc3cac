"""Streaming WebDataset loader whose output is a pure function of (seed, epoch, rank, worker): resume is exact.

Layout. A rank runs ``W = max(num_workers, 1)`` *logical workers*; there are ``world_size * W`` reader slots.
For epoch ``e`` the shard list is permuted with an RNG seeded from ``(seed, e)`` (identity when
``shuffle=False``); logical worker ``w`` of rank ``r`` has slot ``r + world_size * w`` and reads shards
``perm[slot::num_slots]`` (split by rank, then by worker) in that order. Each worker runs its own epochs one
after another forever ("per-worker resampled epochs"): no rank waits for another and none runs dry.

Inside a shard the raw members come through webdataset's tar iterator and key grouping; only image
(``png/jpg/jpeg/webp``) and ``cls`` members are read, everything else is skipped unread (never unpickled). The
shard's samples are shuffled with an RNG seeded from ``(seed, epoch, rank, worker, shard cursor)``, and sample
``offset`` is augmented with an RNG seeded from ``(seed, epoch, rank, worker, shard cursor, offset)``.

Position. A worker's position is ``(epoch, shard cursor, offset)`` = the next sample it would produce, plus
cumulative ``seen``/``skipped`` counters. Every batch carries its worker's position after its last sample; the
:class:`TrainLoader` stores it per logical worker when the batch is handed to the caller, so ``state_dict()`` is
exact for what the trainer consumed, no matter how much the DataLoader prefetched. DataLoader visits workers
round-robin from worker 0 on each new iterator, so after ``k`` consumed batches physical worker ``i`` plays
logical worker ``(i + k) % W``. On resume a worker re-reads only its current shard and skips (undecoded) to its
offset.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import struct
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitscale.data.tario import image_and_label, read_shard
from vitscale.errors import DataError
from vitscale.data.transforms import (EVAL_CROP_FRACTION, DeferredJpeg, decode, eval_transform, jpeg_size,
                                      train_crop, train_transform)

log = logging.getLogger("vitscale.data")

STATE_VERSION = 1
# The bad-sample fraction is only enforced once a worker has seen this many samples (one early bad file in a
# healthy data set must not stop a run).
MIN_SEEN_FOR_BAD_CHECK = 100


# ----- deterministic seeds -------------------------------------------------------------------------------------
def _seed(*parts) -> int:
    """A 63-bit seed mixed from a tag and integers (stable across processes and Python versions)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else struct.pack("<q", int(p) & 0x7FFFFFFFFFFFFFFF))
        h.update(b"|")
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFFFFFFFFFF


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def worker_shards(num_shards: int, epoch: int, *, seed: int, shuffle: bool, rank: int, world_size: int,
                  worker: int, num_workers: int) -> list[int]:
    """Shard indices logical worker ``worker`` of ``rank`` reads in ``epoch``, in order."""
    if shuffle:
        perm = torch.randperm(num_shards, generator=_gen("shards", seed, epoch)).tolist()
    else:
        perm = list(range(num_shards))
    slots = world_size * max(num_workers, 1)
    return perm[rank + world_size * worker::slots]


# ----- the per-worker stream ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamPlan:
    urls: tuple
    seed: int
    rank: int
    world_size: int
    num_workers: int  # logical workers per rank (>= 1)
    shuffle: bool
    batch_size: int
    img_size: int
    crop_min_scale: float
    max_bad_fraction: float
    decode_on: str = "worker"  # "device": JPEGs go to the trainer undecoded, with their crop drawn (see transforms)
    randaug: str = ""  # timm RandAugment config, applied after the crop (data.randaug; see data/augment.py)


# A worker's position: the next sample it would produce, and cumulative counters. ``skipped`` counts every bad
# sample and every damaged shard (what data.max_bad_fraction limits); ``bad_shards`` the damaged shards alone.
POSITION_KEYS = ("epoch", "shard", "offset", "seen", "skipped", "bad_shards")


def _fresh_position(epoch: int = 0) -> dict:
    return {k: epoch if k == "epoch" else 0 for k in POSITION_KEYS}


def _position(d: dict) -> dict:
    return {k: int(d.get(k, 0)) for k in POSITION_KEYS}  # states written before bad_shards existed lack it


def iter_worker_samples(plan: StreamPlan, worker: int, position: Optional[dict] = None,
                        decode_images: bool = True) -> Iterator[tuple]:
    """Forever: ``(key, image uint8 (3,S,S) or None, label, position_after)`` for one logical worker, starting
    at ``position`` (see ``POSITION_KEYS``). Corrupt samples and damaged shards are skipped and counted."""
    pos = _position(position or _fresh_position())
    epoch, cursor, offset = pos["epoch"], pos["shard"], pos["offset"]
    seen, skipped, bad_shards = pos["seen"], pos["skipped"], pos["bad_shards"]
    args = dict(seed=plan.seed, shuffle=plan.shuffle, rank=plan.rank, world_size=plan.world_size,
                worker=worker, num_workers=plan.num_workers)
    where = f"rank {plan.rank} worker {worker}"

    def check():
        if seen >= MIN_SEEN_FOR_BAD_CHECK and skipped > plan.max_bad_fraction * seen:
            raise DataError(f"too many bad samples: {skipped} of {seen} skipped by data {where} (more than "
                               f"data.max_bad_fraction={plan.max_bad_fraction}); check the shards")

    while True:
        shards = worker_shards(len(plan.urls), epoch, **args)
        whole_epoch, produced = cursor == 0 and offset == 0, False
        while cursor < len(shards):
            url = plan.urls[shards[cursor]]
            samples, error = read_shard(url)
            if error is not None and offset == 0:  # counted once: when the shard is entered, not on resume
                seen += 1
                skipped += 1
                bad_shards += 1
                log.warning("vitscale.data: skipping the rest of shard %s (%d samples read): %s", url,
                            len(samples), error)
                check()
            if plan.shuffle:
                order = torch.randperm(len(samples), generator=_gen("order", plan.seed, epoch, plan.rank, worker,
                                                                     cursor)).tolist()
            else:
                order = list(range(len(samples)))
            for o in range(offset, len(samples)):
                sample = samples[order[o]]
                samples[order[o]] = None  # free the bytes as we go
                key = sample["__key__"]
                seen += 1
                try:
                    data, label = image_and_label(sample)
                    img = None
                    if decode_images:
                        g = _gen("aug", plan.seed, epoch, plan.rank, worker, cursor, o)
                        size = jpeg_size(data) if plan.decode_on == "device" else None
                        if size is not None:  # the same draws from g as below: the same crop either way
                            img = DeferredJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                               train_crop(*size, plan.img_size, g, plan.crop_min_scale,
                                                          randaug=plan.randaug))
                        else:
                            img = train_transform(decode(data), plan.img_size, g, plan.crop_min_scale,
                                                  randaug=plan.randaug)
                except Exception as e:
                    skipped += 1
                    log.warning("vitscale.data: skipping bad sample %s in %s: %s", key, url, e)
                    check()
                    continue
                produced = True
                yield key, img, label, {"epoch": epoch, "shard": cursor, "offset": o + 1, "seen": seen,
                                        "skipped": skipped, "bad_shards": bad_shards}
                check()
            cursor, offset = cursor + 1, 0
        if whole_epoch and not produced:  # looping on would hang the run without a word
            raise DataError(f"data {where} read no valid sample in epoch {epoch} from its {len(shards)} "
                               f"shard(s), e.g. {plan.urls[shards[0]]}")
        epoch, cursor, offset = epoch + 1, 0, 0


def _collate(items: list, worker: int) -> dict:
    keys, imgs, labels, pos = zip(*items)
    images = torch.stack(imgs) if all(torch.is_tensor(x) for x in imgs) else list(imgs)  # list: see materialize
    return {"image": images, "label": torch.tensor(labels, dtype=torch.int64), "key": list(keys),
            "stream": {"worker": worker, **pos[-1]}}


def iter_worker_batches(plan: StreamPlan, worker: int, position: Optional[dict] = None) -> Iterator[dict]:
    buf = []
    for item in iter_worker_samples(plan, worker, position):
        buf.append(item)
        if len(buf) == plan.batch_size:
            yield _collate(buf, worker)
            buf = []


class _TrainStream(IterableDataset):
    def __init__(self, plan: StreamPlan, positions: list[dict], consumed: int):
        self.plan, self.positions, self.consumed = plan, positions, consumed

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.consumed) % self.plan.num_workers
        return iter_worker_batches(self.plan, worker, self.positions[worker])


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decode/resize per sample; workers already run in parallel


def _check_slots(num_shards: int, world_size: int, num_workers: int) -> None:
    w = max(num_workers, 1)
    if num_shards < world_size * w:
        raise ValueError(f"{num_shards} shards cannot feed {world_size} rank(s) x {w} worker(s) = "
                         f"{world_size * w} readers: write more, smaller shards or lower data.num_workers")


# ----- the loader the trainer uses -----------------------------------------------------------------------------
class TrainLoader:
    """Infinite iterable of batches with an exact ``state_dict()`` (see the module docstring).

    Batches: ``image`` uint8 (B,3,S,S), ``label`` int64 (B,) (-1 = no label), ``key`` list[str], ``stream``
    ``{worker, **position}`` (the worker's position after its last sample, see ``POSITION_KEYS``). Use one
    iterator at a time; ``iter()`` again continues from the last batch handed out.
    """

    def __init__(self, plan: StreamPlan, num_workers: int, state: Optional[dict] = None):
        self.plan, self.num_workers = plan, num_workers
        self.positions = [_fresh_position() for _ in range(plan.num_workers)]
        self.batches = 0
        if state:
            self.load_state_dict(state)

    def _layout(self) -> dict:
        p = self.plan
        return {"seed": p.seed, "rank": p.rank, "world_size": p.world_size, "num_workers": p.num_workers,
                "num_shards": len(p.urls), "shuffle": p.shuffle}

    def state_dict(self) -> dict:
        """Plain JSON-serialisable dict: layout, ``batches`` consumed, and ``workers`` = one
        position (``POSITION_KEYS``) per logical worker."""
        return {"version": STATE_VERSION, **self._layout(), "batches": self.batches,
                "workers": copy.deepcopy(self.positions)}

    def skipped(self) -> tuple[int, int]:
        """(bad samples, damaged shards) this rank's stream skipped so far, over all its workers."""
        shards = sum(w["bad_shards"] for w in self.positions)
        return sum(w["skipped"] for w in self.positions) - shards, shards

    def load_state_dict(self, state: dict) -> None:
        layout = self._layout()
        old = {k: state.get(k) for k in layout}
        workers = state.get("workers") or []
        if state.get("version") == STATE_VERSION and old == layout and len(workers) == self.plan.num_workers:
            self.positions = [_position(w) for w in workers]
            self.batches = int(state["batches"])
            return
        # Different layout (e.g. another world size): exact resume is impossible; start a fresh epoch after the
        # furthest one any worker reached, so recently seen data is not simply replayed from the start.
        epoch = max((int(w.get("epoch", 0)) for w in workers), default=-1) + 1
        changed = {k: (old[k], layout[k]) for k in layout if old[k] != layout[k]}
        log.warning("vitscale.data: data-stream state does not match this run (%s): starting epoch %d fresh",
                    changed or "format", epoch)
        self.positions = [_fresh_position(epoch) for _ in range(self.plan.num_workers)]
        self.batches = 0

    def __iter__(self) -> Iterator[dict]:
        return _TrainIterator(self)


class _TrainIterator:
    def __init__(self, loader: TrainLoader):
        self.loader = loader
        dataset = _TrainStream(loader.plan, copy.deepcopy(loader.positions), loader.batches)
        # Building the DataLoader iterator now (not lazily) and giving it its own generator keeps the global
        # torch RNG untouched, so the trainer's RNG state is the same on every launch.
        dl = DataLoader(dataset, batch_size=None, num_workers=loader.num_workers, persistent_workers=False,
                        pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
                        generator=torch.Generator().manual_seed(loader.plan.seed))
        self.it = iter(dl)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.it)
        loader = self.loader
        s = batch["stream"]
        expected = loader.batches % loader.plan.num_workers
        if s["worker"] != expected:
            raise RuntimeError(f"data stream out of order: batch {loader.batches} came from logical worker "
                               f"{s['worker']}, expected {expected}")
        loader.positions[s["worker"]] = _position(s)
        loader.batches += 1
        return batch


def build_train_loader(urls: Sequence[str], *, batch_size: int, img_size: int, seed: int, rank: int,
                       world_size: int, num_workers: int, shuffle: bool = True, crop_min_scale: float = 0.35,
                       state: Optional[dict] = None, max_bad_fraction: float = 0.01,
                       decode_on: str = "worker", randaug: str = "") -> TrainLoader:
    """Infinite training stream for one rank; ``state`` is a previous ``TrainLoader.state_dict()``."""
    urls = list(urls)
    if not urls:
        raise ValueError("no training shards")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    _check_slots(len(urls), world_size, num_workers)
    plan = StreamPlan(urls=tuple(urls), seed=int(seed), rank=rank, world_size=world_size,
                      num_workers=max(num_workers, 1), shuffle=bool(shuffle), batch_size=batch_size,
                      img_size=img_size, crop_min_scale=float(crop_min_scale),
                      max_bad_fraction=float(max_bad_fraction), decode_on=decode_on, randaug=randaug)
    return TrainLoader(plan, num_workers, state)


def train_loader_from_config(cfg, urls: Sequence[str], rank: int, world_size: int,
                             state: Optional[dict] = None) -> TrainLoader:
    """The training stream a run's config (``vitscale.config.Config``) describes, for one rank."""
    d = cfg.data
    return build_train_loader(urls, batch_size=d.batch_size, img_size=cfg.model.img_size, seed=cfg.run.seed,
                              rank=rank, world_size=world_size, num_workers=d.num_workers, shuffle=d.shuffle,
                              crop_min_scale=d.crop_min_scale, max_bad_fraction=d.max_bad_fraction, state=state,
                              decode_on=d.decode_on, randaug=d.randaug)


# ----- evaluation ----------------------------------------------------------------------------------------------
class _EvalStream(IterableDataset):
    """One pass; sample i of the concatenated shards goes to rank i % world_size, then to that rank's worker
    j % num_workers (j = index among the rank's samples)."""

    def __init__(self, urls, batch_size, img_size, rank, world_size, crop_pct=EVAL_CROP_FRACTION):
        self.urls, self.batch_size, self.img_size, self.crop_pct = list(urls), batch_size, img_size, crop_pct
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        buf, i, j = [], 0, 0
        for url in self.urls:
            samples, error = read_shard(url)
            if error is not None:
                log.warning("vitscale.data: eval shard %s unreadable after %d samples: %s", url, len(samples),
                            error)
            for sample in samples:
                mine = i % self.world_size == self.rank
                i += 1
                if not mine:
                    continue
                j += 1
                if (j - 1) % nw != wid:
                    continue
                try:
                    data, label = image_and_label(sample)
                    img = eval_transform(decode(data), self.img_size, self.crop_pct)
                except Exception as e:
                    log.warning("vitscale.data: skipping bad eval sample %s in %s: %s", sample["__key__"], url, e)
                    continue
                buf.append((sample["__key__"], img, label))
                if len(buf) == self.batch_size:
                    yield self._collate(buf)
                    buf = []
        if buf:
            yield self._collate(buf)

    @staticmethod
    def _collate(items):
        keys, imgs, labels = zip(*items)
        return {"image": torch.stack(imgs), "label": torch.tensor(labels, dtype=torch.int64), "key": list(keys)}


def build_eval_loader(urls: Sequence[str], *, batch_size: int, img_size: int, rank: int, world_size: int,
                      num_workers: int = 0, crop_pct: float = EVAL_CROP_FRACTION) -> DataLoader:
    """Finite, one pass, eval transform; across ranks every sample is visited exactly once. Batches as in
    training without ``stream`` (the last one may be smaller; a rank may get none)."""
    urls = list(urls)
    if not urls:
        raise ValueError("no evaluation shards")
    return DataLoader(_EvalStream(urls, batch_size, img_size, rank, world_size, crop_pct), batch_size=None,
                      num_workers=num_workers, persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(0))
