"""An epoch's global sample order, cut into equal work for the reader slots, and resuming it on another layout.

Epoch ``e`` permutes the shards with an RNG seeded from ``(seed, e)`` and cuts the permutation into *blocks* of
near-equal size, as many as a multiple of the reader slots and of at most ``k`` shards each
(:func:`block_layout`). A block's samples are one deterministic stream: its shards are open at once and
interleaved through a seeded buffer of ``shuffle_buffer`` samples (:func:`block_stream`), so a block's stream
depends on ``(seed, e, cut, block)`` and the shards' bytes, nothing else. The blocks are the work *items* of the
epoch; reader slot ``s`` of ``S`` (``S`` = ranks x workers) reads ``items[s::S]`` in order, the same number of
shards as every other slot (to one shard a block).

An item is ``(block, start)``: the block's stream from entry ``start`` on (0 unless a resume split the block).
A slot's position is ``(epoch, item, offset)`` = the next entry it would read is entry ``start + offset`` of its
``item``-th item. Resuming on another layout (:func:`elastic_plans`) gathers every old slot's position, lists
per epoch in progress what is left (the unfinished remainders first read by nobody, in block order) and deals
that to the new slots: no entry is read twice, none is lost, and a sample keeps its augmentation (seeded by
block and entry, not by slot).

The cut depends on the number of slots (it is what keeps their epochs equal), so the global order is the same
on another layout only where both cut alike. An epoch in progress keeps the cut it started with, whatever the
layout that resumes it (states saved before 2026-12-06 cut into chunks of ``k`` and keep that).
"""
from __future__ import annotations

import hashlib
import random
import struct
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

from vitscale.data.tario import ShardError, iter_shard


# ----- deterministic seeds -------------------------------------------------------------------------------------
def seed_of(*parts) -> int:
    """A 63-bit seed mixed from a tag and integers (stable across processes and Python versions)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else struct.pack("<q", int(p) & 0x7FFFFFFFFFFFFFFF))
        h.update(b"|")
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFFFFFFFFFF


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*parts))


# ----- an epoch's blocks ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Order:
    """What fixes every epoch's global order (the same on every rank and every launch of a run)."""
    seed: int
    num_shards: int
    shuffle: bool
    shards_in_flight: int
    shuffle_buffer: int

    def as_dict(self) -> dict:
        return {"seed": self.seed, "num_shards": self.num_shards, "shuffle": self.shuffle,
                "shards_in_flight": self.shards_in_flight, "shuffle_buffer": self.shuffle_buffer}


@dataclass(frozen=True)
class Cut:
    """How an epoch's shard permutation is cut into blocks. ``k`` also seeds a block's mixing and augmentation."""
    k: int  # shards per block (at most)
    blocks: int = 0  # > 0: this many blocks of near-equal size; 0: consecutive chunks of k shards (the only cut
    # before 2026-12-06: a state saved then keeps it, so its resume stays exact)

    def count(self, num_shards: int) -> int:
        return self.blocks or -(-num_shards // self.k)

    def bounds(self, num_shards: int, block: int) -> tuple[int, int]:
        """Where ``block`` starts and ends in the epoch's permutation. Near-equal blocks: the first ``num_shards %
        blocks`` have one shard more, so that dealt round-robin no slot gets more than one larger block than
        another."""
        if self.blocks:
            size, extra = divmod(num_shards, self.blocks)
            start = block * size + min(block, extra)
            return start, start + size + (block < extra)
        return block * self.k, min((block + 1) * self.k, num_shards)


@dataclass(frozen=True)
class EpochPlan:
    cut: Cut
    items: tuple  # ((block, start), ...)


def block_layout(order: Order, slots: int) -> Cut:
    """The cut of new epochs: as many blocks as a multiple of the reader slots, each of at most
    ``shards_in_flight`` shards and of near-equal size, so that every slot's epoch holds the same number of shards
    (to one shard a block). Slots read at the same batch rate, so a slot with fewer starts its next epoch sooner:
    with chunks of 16, 1281 shards over 64 slots gave slots 16 or 32 shards and an epoch's worth of steps read
    ~85% of the samples; 128 blocks of 10-11 give 20-21."""
    slots = max(slots, 1)
    blocks = min(slots * -(-order.num_shards // (slots * order.shards_in_flight)), order.num_shards)
    return Cut(-(-order.num_shards // blocks), blocks)


def slot_shards(order: Order, slots: int) -> list[int]:
    """Shards each reader slot reads in a new epoch (equal to one shard a block, unless there are few shards)."""
    cut = block_layout(order, slots)
    sizes = [hi - lo for lo, hi in (cut.bounds(order.num_shards, b) for b in range(cut.count(order.num_shards)))]
    return [sum(sizes[s::slots]) for s in range(slots)]


def default_plan(order: Order, cut: Cut) -> EpochPlan:
    return EpochPlan(cut, tuple((b, 0) for b in range(cut.count(order.num_shards))))


def shard_permutation(order: Order, epoch: int) -> list[int]:
    """Epoch ``epoch``'s shard order. Unshuffled: the shards in order, rotated by one shard an epoch, so that over
    the epochs each reader slot reads every shard (without it a slot always read the same block, and a small
    block's samples were read as many times more often as it was smaller)."""
    if not order.shuffle:
        n = order.num_shards
        return [(epoch + i) % n for i in range(n)]
    return torch.randperm(order.num_shards, generator=generator("shards", order.seed, epoch)).tolist()


def block_shards(order: Order, epoch: int, cut: Cut, block: int) -> list[int]:
    """Shard indices of ``block`` in ``epoch``."""
    lo, hi = cut.bounds(order.num_shards, block)
    return shard_permutation(order, epoch)[lo:hi]


Entry = Union[dict, ShardError]


def block_stream(urls: Sequence[str], order: Order, epoch: int, cut: Cut, block: int,
                 label_ext: str = "cls") -> Iterator[Entry]:
    """A block's entries: samples (dicts) and the errors of damaged shards, where they occur.

    With shuffling, the block's shards are open together; a seeded RNG picks which open shard gives the next
    sample to the buffer and which buffered sample leaves next (once the buffer is full, or the shards are
    drained). Memory: the buffer plus one sample per open shard, whatever the shards' size. Without shuffling,
    the shards are read one after another in order."""
    shards = [urls[i] for i in block_shards(order, epoch, cut, block)]
    if not order.shuffle:
        for url in shards:
            yield from iter_shard(url, label_ext)
        return
    rng = random.Random(seed_of("mix", order.seed, epoch, cut.k, block))
    sources = [iter_shard(u, label_ext) for u in shards]
    live = list(range(len(sources)))
    buf: list = []
    cap = max(1, order.shuffle_buffer)
    while True:
        while live and len(buf) < cap:
            i = rng.randrange(len(live))
            entry = next(sources[live[i]], None)
            if entry is None:
                live.pop(i)
            elif isinstance(entry, ShardError):
                yield entry
            else:
                buf.append(entry)
        if not buf:
            return
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


# ----- resuming on another layout ------------------------------------------------------------------------------
def plans_to_json(plans: dict) -> list:
    return [[e, p.cut.k, [list(it) for it in p.items], p.cut.blocks] for e, p in sorted(plans.items())]


def plans_from_json(raw) -> dict:
    """(A plan saved before 2026-12-06 has no block count: chunks of k.)"""
    return {int(e): EpochPlan(Cut(int(k), int(rest[0]) if rest else 0), tuple((int(b), int(s)) for b, s in items))
            for e, k, items, *rest in raw or []}


def _left_in_epoch(epoch: int, plan: EpochPlan, slots: int, positions: list[dict]) -> list[tuple[int, int]]:
    """The items of ``epoch`` no old slot finished: each slot's current remainder and its untouched items."""
    left = []
    for s, pos in enumerate(positions):
        mine = plan.items[s::slots]
        if pos["epoch"] > epoch:
            continue
        if pos["epoch"] < epoch:
            left += mine
            continue
        cursor = pos["item"]
        if cursor < len(mine):
            block, start = mine[cursor]
            left.append((block, start + pos["offset"]))
            left += mine[cursor + 1:]
    return sorted(left)


# Epochs between the slowest and the fastest reader slot of one saved state: slots read at one batch rate, so they
# differ by a few epochs (more only for tiny shard sets read for thousands of epochs). An elastic resume builds a
# plan for every epoch between them: a damaged state claiming epochs 0 and 10^12 would never finish.
MAX_EPOCH_SPAN = 10_000


def elastic_plans(order: Order, old_cut: Cut, old_plans: dict, old_positions: list[dict]) -> tuple[int, dict]:
    """From every old slot's position (slot order), the epoch new slots start in and the plans of the epochs in
    progress, holding exactly what no old slot read (cut as the old layout cut them)."""
    first = min(p["epoch"] for p in old_positions)
    last = max(p["epoch"] for p in old_positions)
    if last - first > MAX_EPOCH_SPAN:  # the readers check states first (data.resume); this guards other callers
        raise ValueError(f"saved reader positions span epochs {first}..{last}, more than {MAX_EPOCH_SPAN} apart")
    plans = {}
    for e in range(first, last + 1):
        plan = old_plans.get(e) or default_plan(order, old_cut)
        plans[e] = EpochPlan(plan.cut, tuple(_left_in_epoch(e, plan, len(old_positions), old_positions)))
    return first, plans


def slot_index(rank: int, world_size: int, worker: int) -> int:
    """Reader slot of logical ``worker`` of ``rank``: by rank first, so shrinking the workers keeps slots apart."""
    return rank + world_size * worker


def epoch_plan(plans: dict, order: Order, cut: Cut, epoch: int) -> EpochPlan:
    got: Optional[EpochPlan] = plans.get(epoch)
    return got if got is not None else default_plan(order, cut)
