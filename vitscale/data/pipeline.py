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
import functools
import logging
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitscale import faults
from vitscale.data import worker_death
from vitscale.data.batch_ring import Releases, Ring
from vitscale.data.evaluation import worker_init
from vitscale.data.order import Order, block_layout, plans_from_json, plans_to_json, slot_shards
from vitscale.data.resume import COUNTERS, STATE_VERSION, merge_states, not_elastic, saved_cut
from vitscale.data.resume import fresh_position as _fresh_position
from vitscale.data.resume import position as _position
from vitscale.data.stream import StreamPlan, iter_worker_batches
from vitscale.data.tario import label_ext
from vitscale.data.transforms import DEFAULT_MAX_PIXELS

log = logging.getLogger("vitscale.data")


def _single_batches(plan: StreamPlan, positions: list[dict], worker: int, first_batch: int,
                    ring: Optional[Ring]) -> Iterator[dict]:
    return iter_worker_batches(plan, worker, positions[worker], ring)


class TrainStream(IterableDataset):
    """Each DataLoader worker's batches: ``batches(logical worker, its next batch number, ring)``."""

    def __init__(self, batches: Callable, num_workers: int, rank: int, consumed: int, released: torch.Tensor):
        self.batches, self.num_workers, self.rank = batches, num_workers, rank
        self.consumed, self.released = consumed, released

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.consumed) % self.num_workers
        first = self.consumed + (worker - self.consumed) % self.num_workers
        if info is None:  # in the trainer's process: nothing to hand over through shared memory
            return self.batches(worker, first, None)
        return _fault_point(self.batches(worker, first, Ring(self.released, worker)), self.rank, physical)


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
        return {"version": STATE_VERSION, **self._layout(), "k": self.plan.cut.k, "blocks": self.plan.cut.blocks,
                "plans": plans_to_json(plans),
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
            # the cut of new epochs as saved (a state saved before block_layout cut chunks of k): exact either way
            self.plan = dataclasses.replace(self.plan, plans=plans_from_json(s.get("plans")), cut=saved_cut(s))
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

    def source_samples(self) -> dict:
        """Samples this rank took from each source of a mix ({} for one source: see :mod:`vitscale.data.mix`)."""
        return {}

    def _dataset(self, released: torch.Tensor) -> TrainStream:
        batches = functools.partial(_single_batches, self.plan, copy.deepcopy(self.positions))
        return TrainStream(batches, self.plan.num_workers, self.plan.rank, self.batches, released)

    def _take(self, stream: dict) -> None:
        """Record the position a batch carries, as it is handed to the caller."""
        self.positions[stream["worker"]] = _position(stream)

    def __iter__(self) -> Iterator[dict]:
        return _TrainIterator(self)


class _TrainIterator:
    def __init__(self, loader: TrainLoader):
        self.loader = loader
        self.releases = Releases(loader.plan.num_workers)
        dataset = loader._dataset(self.releases.table)
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
        loader._take(s)
        loader.batches += 1
        if "ring_seq" in batch:
            self.releases.handed_out(s["worker"], batch.pop("ring_seq"), batch["image"])
        return batch


def _check_slots(num_shards: int, world_size: int, num_workers: int) -> None:
    w = max(num_workers, 1)
    if num_shards < world_size * w:
        raise ValueError(f"{num_shards} shards cannot feed {world_size} rank(s) x {w} worker(s) = "
                         f"{world_size * w} readers: write more, smaller shards or lower data.num_workers")


def _warn_uneven_epochs(order: Order, slots: int) -> None:
    """Say when the reader slots' epochs still differ in length by more than 10% (few shards a slot: blocks of
    near-equal size even out the rest): each "epoch" of steps then reads only part of the data once."""
    loads = slot_shards(order, slots)
    if max(loads) <= 1.1 * min(loads):
        return
    seen = sum(min(x, order.num_shards / slots) for x in loads) / order.num_shards
    log.warning("vitscale.data: %d shards over %d reader slots (ranks x workers) give slots %d-%d shards an epoch: "
                "a slot with fewer starts its next epoch sooner, so an epoch's worth of steps reads about %.0f%% of "
                "the samples, some twice (the rest in later epochs); a shard count that is a multiple of %d, or "
                "more shards, evens it out", order.num_shards, slots, min(loads), max(loads), 100 * seen, slots)


def build_train_loader(urls: Sequence[str], *, batch_size: int, img_size: int, seed: int, rank: int,
                       world_size: int, num_workers: int, shuffle: bool = True, crop_min_scale: float = 0.35,
                       state: Union[dict, list, None] = None, max_bad_fraction: float = 0.01,
                       decode_on: str = "worker", shards_in_flight: int = 16, shuffle_buffer: int = 1000,
                       label_key: str = "cls", num_classes: int = 0,
                       max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, randaug: str = "",
                       reduced_decode: bool = True, interpolation: str = "bilinear") -> TrainLoader:
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
    cut = block_layout(order, world_size * workers)
    if rank == 0:
        _warn_uneven_epochs(order, world_size * workers)
    plan = StreamPlan(urls=tuple(urls), order=order, rank=rank, world_size=world_size, num_workers=workers,
                      batch_size=batch_size, img_size=img_size, crop_min_scale=float(crop_min_scale),
                      max_bad_fraction=float(max_bad_fraction), decode_on=decode_on, label_key=label_key,
                      num_classes=int(num_classes), max_pixels=max_pixels, cut=cut, randaug=randaug,
                      reduced_decode=reduced_decode, interpolation=interpolation)
    return TrainLoader(plan, num_workers, state)


def loader_kwargs(cfg, num_classes: int = 0) -> dict:
    """:func:`build_train_loader`'s arguments from a run's config (``vitscale.config.Config``), all but the urls,
    the rank, the world size and the state: the same for every source of a mix."""
    d = cfg.data
    return dict(batch_size=d.batch_size, img_size=cfg.model.img_size, seed=cfg.run.seed, num_workers=d.num_workers,
                shuffle=d.shuffle, crop_min_scale=d.crop_min_scale, max_bad_fraction=d.max_bad_fraction,
                decode_on=d.decode_on, shards_in_flight=d.shards_in_flight, shuffle_buffer=d.shuffle_buffer,
                label_key=d.label_key, num_classes=num_classes, max_pixels=d.max_pixels or None, randaug=d.randaug,
                interpolation=d.interpolation)


def train_loader_from_config(cfg, urls: Sequence[str], rank: int, world_size: int,
                             state: Union[dict, list, None] = None, num_classes: int = 0) -> TrainLoader:
    """The training stream a run's config (``vitscale.config.Config``) describes, for one rank. ``num_classes``
    > 0 (supervised runs) skips and counts samples without a label in range."""
    return build_train_loader(urls, rank=rank, world_size=world_size, state=state, **loader_kwargs(cfg, num_classes))
