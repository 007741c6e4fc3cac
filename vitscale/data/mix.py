"""Several weighted sources of training shards in one stream, in fixed proportions, resumable exactly and elastically.

Schedule. The trainer's samples have a *global index*: sample ``i`` of rank ``r``'s ``b``-th batch is
``origin + (b * world_size + r) * batch_size + i`` (ranks take batches in lockstep, so the first ``n`` batches of
every rank are exactly the indices below ``origin + n * world_size * batch_size``). Global sample ``k`` comes from
source :func:`source_of` ``(k)``: a golden-ratio (Weyl) sequence ``u_k = k * 2^64/phi + phase (mod 2^64)`` cut at
the weights' cumulative shares. It depends on the weights, the seed and ``k`` only, never on the world size or the
workers, and over any ``n`` consecutive samples each source's count is within a few samples of ``n * share``
(the sequence is equidistributed with discrepancy O(log n / n)), so batches are mixed evenly, not just on average.

Sources. Each source is an ordinary single-source stream (:mod:`vitscale.data.stream`) with its own seed (mixed from
``run.seed`` and the source's name), its own epochs and its own position per logical worker; a worker takes the
next sample of source ``s`` from its own slot of that source's order. A source that runs out starts its own next
epoch, whatever the others do.

Resume. The state is one single-source state per source (exactly what a one-source run saves) plus the schedule's
``origin`` and the batches consumed. The same layout resumes exactly. Another world size, worker count or batch
size moves ``origin`` past everything consumed and resumes each source elastically (its epochs in progress are
finished by the new slots, :func:`vitscale.data.order.elastic_plans`): the schedule, hence every source's count at
each global index, is the uninterrupted run's, and no source's sample is repeated or dropped within its epochs.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Optional, Sequence, Union

import torch

from vitscale.config.sources import Source, parse_sources
from vitscale.data.batch_ring import Ring
from vitscale.data.order import Order, seed_of
from vitscale.data.pipeline import (TrainLoader, TrainStream, build_train_loader, loader_kwargs,
                                    train_loader_from_config)
from vitscale.data.resume import position as _position
from vitscale.data.shards import ShardSet, resolve_shards
from vitscale.data.stream import WorkerStream, collate_batch

log = logging.getLogger("vitscale.data")

MIX_VERSION = 1
_ONE = 1 << 64
GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio (odd): the most evenly spread Weyl sequence


# ----- the schedule -------------------------------------------------------------------------------------------
def bounds_of(weights: Sequence[float]) -> tuple:
    """Cumulative upper bounds (of 2^64) of every source but the last; a zero weight is an empty interval."""
    total = sum(Fraction(repr(float(w))) for w in weights)
    out, acc = [], Fraction(0)
    for w in weights[:-1]:
        acc += Fraction(repr(float(w)))
        out.append(int(acc / total * _ONE))
    return tuple(out)


def source_of(k: int, bounds: Sequence[int], phase: int) -> int:
    """The source of global sample ``k``: exact integer arithmetic, the same on every process."""
    u = (k * GOLDEN + phase) % _ONE
    lo, hi = 0, len(bounds)
    while lo < hi:  # bisect_right: the number of bounds <= u
        mid = (lo + hi) // 2
        if bounds[mid] <= u:
            lo = mid + 1
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class MixPlan:
    names: tuple
    weights: tuple
    bounds: tuple
    phase: int
    origin: int  # global index of this layout's first sample (0, or past everything consumed before a resume)
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    order: Order  # source 0's (the DataLoader's generator is seeded from it)

    def first_index(self, batch: int) -> int:
        return self.origin + (batch * self.world_size + self.rank) * self.batch_size


def iter_mix_batches(plan: MixPlan, streams: tuple, positions: list, worker: int, first_batch: int,
                     ring: Optional[Ring]) -> Iterator[dict]:
    """Logical ``worker``'s batches ``first_batch``, ``first_batch + W``, ...: each sample from the source the
    schedule names, read from that source's stream (opened only when first needed)."""
    sources = [WorkerStream(p, worker, positions[s][worker]) for s, p in enumerate(streams)]
    its = [iter(ws) for ws in sources]
    now = [_position(positions[s][worker]) for s in range(len(streams))]
    batch = first_batch
    while True:
        start, items, picked = plan.first_index(batch), [], []
        for i in range(plan.batch_size):
            s = source_of(start + i, plan.bounds, plan.phase)
            key, img, label, now[s] = next(its[s])
            items.append((key, img, label, {}))
            picked.append(s)
        out = collate_batch(items, worker, ring)
        out["stream"] = {"worker": worker, "sources": copy.deepcopy(now)}
        out["source"] = torch.tensor(picked, dtype=torch.int64)
        yield out
        batch += plan.num_workers


# ----- the loader ---------------------------------------------------------------------------------------------
class MixLoader(TrainLoader):
    """:class:`TrainLoader`'s contract for a mix: batches also carry ``source`` (B,) source indices, and
    :meth:`source_samples` counts this rank's samples per source. ``parts`` are one single-source loader per
    source: they hold each source's plan, positions and counters (never iterated themselves)."""

    def __init__(self, plan: MixPlan, parts: list[TrainLoader], num_workers: int,
                 state: Union[dict, list, None] = None):
        self.plan, self.parts, self.num_workers = plan, parts, num_workers
        self.batches = 0
        if state:
            self.load_state_dict(state)

    def _layout(self) -> dict:
        p = self.plan
        return {"rank": p.rank, "world_size": p.world_size, "num_workers": p.num_workers}

    def state_dict(self) -> dict:
        sources = {}
        for name, part in zip(self.plan.names, self.parts):
            part.batches = self.batches
            sources[name] = part.state_dict()
        return {"version": MIX_VERSION, "mix": True, **self._layout(), "batch_size": self.plan.batch_size,
                "origin": self.plan.origin, "batches": self.batches, "sources": sources}

    def skipped(self) -> tuple[int, int]:
        counts = [p.skipped() for p in self.parts]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def source_samples(self) -> dict:
        """{source name: samples of it this rank handed out} (valid samples: read minus skipped), including the
        counts an elastic resume carried over (to rank 0)."""
        out = {}
        for name, part in zip(self.plan.names, self.parts):
            read = sum(w["seen"] - w["skipped"] for w in part.positions)
            out[name] = read + part.carried["seen"] - part.carried["skipped"]
        return out

    def load_state_dict(self, state: Union[dict, list]) -> None:
        """This rank's state (the same processes x workers: exact), or every rank's (another layout: elastic)."""
        states = [s for s in (list(state) if isinstance(state, (list, tuple)) else [state])
                  if s.get("version") == MIX_VERSION and s.get("mix")]
        if not states:
            log.warning("vitscale.data: the saved data-stream state is not a mix of sources: every source starts "
                        "at its epoch 0")
            return
        layout = self._layout()
        own = [s for s in states if {k: s.get(k) for k in layout} == layout]
        s = own[0] if own else states[0]
        consumed = int(s["origin"]) + int(s["batches"]) * int(s["world_size"]) * int(s["batch_size"])
        if own and int(s["batch_size"]) == self.plan.batch_size:  # exact: the schedule goes on where it was
            self.plan, self.batches = dataclasses.replace(self.plan, origin=int(s["origin"])), int(s["batches"])
        else:  # the schedule goes on after every sample consumed, in the new layout's order
            self.plan, self.batches = dataclasses.replace(self.plan, origin=consumed), 0
        for name, part in zip(self.plan.names, self.parts):
            saved = [g["sources"][name] for g in (own[:1] or states) if name in (g.get("sources") or {})]
            if saved:
                part.load_state_dict(saved[0] if own else saved)  # the same layout: exact; else elastic
            else:
                log.warning("vitscale.data: source %r has no saved state: it starts at its epoch 0", name)

    def _dataset(self, released: torch.Tensor) -> TrainStream:
        streams = tuple(p.plan for p in self.parts)
        positions = [copy.deepcopy(p.positions) for p in self.parts]
        batches = functools.partial(iter_mix_batches, self.plan, streams, positions)
        return TrainStream(batches, self.plan.num_workers, self.plan.rank, self.batches, released)

    def _take(self, stream: dict) -> None:
        for part, pos in zip(self.parts, stream["sources"]):
            part.positions[stream["worker"]] = _position(pos)


def build_mix_loader(sources: Sequence[tuple[Source, Sequence[str]]], *, seed: int, rank: int, world_size: int,
                     num_workers: int, batch_size: int, state: Union[dict, list, None] = None,
                     **kw) -> MixLoader:
    """A mix of ``(source, urls)``; ``kw`` are :func:`vitscale.data.pipeline.build_train_loader`'s other
    arguments, the same for every source."""
    parts = []
    for src, urls in sources:
        try:
            parts.append(build_train_loader(urls, seed=seed_of("source", seed, src.name), rank=rank,
                                            world_size=world_size, num_workers=num_workers, batch_size=batch_size,
                                            **kw))
        except ValueError as e:
            raise ValueError(f"data.train_shards source {src.name!r}: {e}") from None
    weights = tuple(s.weight for s, _ in sources)
    plan = MixPlan(names=tuple(s.name for s, _ in sources), weights=weights, bounds=bounds_of(weights),
                   phase=seed_of("mix-phase", seed), origin=0, rank=rank, world_size=world_size,
                   num_workers=max(num_workers, 1), batch_size=batch_size, order=parts[0].plan.order)
    return MixLoader(plan, parts, num_workers, state)


# ----- the training set ---------------------------------------------------------------------------------------
@dataclass
class MixSet:
    """What a mix of sources resolves to: each source with its :class:`ShardSet`. Its size (what one epoch of
    ``train.epochs`` draws) is the sum of the sizes of the sources with a weight > 0, None unless every one of them
    has a manifest with sample counts."""
    sources: list

    @property
    def num_samples(self) -> Optional[int]:
        sizes = [ss.num_samples for s, ss in self.sources if s.weight > 0]
        return None if any(n is None for n in sizes) else sum(sizes)

    @property
    def num_classes(self) -> Optional[int]:
        known = [ss.num_classes for _, ss in self.sources if ss.num_classes]
        return max(known) if known else None

    @property
    def shard_sets(self) -> list[ShardSet]:
        return [ss for _, ss in self.sources]


def resolve_train_set(value, cache_dir: str = "data_cache") -> Union[ShardSet, MixSet]:
    """``data.train_shards`` resolved: a :class:`ShardSet` for one spec, a :class:`MixSet` for several sources
    (a missing file or a bad spec names its source)."""
    sources = parse_sources(value)
    if sources is None:
        return resolve_shards(value, cache_dir)
    out = []
    for src in sources:
        try:
            out.append((src, resolve_shards(src.spec, cache_dir)))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"data.train_shards source {src.name!r}: {e}") from None
    return MixSet(out)


def shard_sets(train_set: Union[ShardSet, MixSet]) -> list[ShardSet]:
    """The shard sets a training set reads (one per source of a mix)."""
    return train_set.shard_sets if isinstance(train_set, MixSet) else [train_set]


def train_stream_from_config(cfg, train_set: Union[ShardSet, MixSet], rank: int, world_size: int,
                             state: Union[dict, list, None] = None, num_classes: int = 0) -> TrainLoader:
    """The training stream of a run's config for one rank: :func:`train_loader_from_config` for one spec, a
    :class:`MixLoader` for several sources."""
    if not isinstance(train_set, MixSet):
        return train_loader_from_config(cfg, train_set.urls, rank, world_size, state, num_classes)
    return build_mix_loader([(s, ss.urls) for s, ss in train_set.sources], rank=rank, world_size=world_size,
                            state=state, **loader_kwargs(cfg, num_classes))
