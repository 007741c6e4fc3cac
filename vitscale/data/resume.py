"""Resuming the data stream: positions, every rank's saved state, and merging them for another layout."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from vitscale.distributed.safeload import safe_load

from vitscale.data.order import Cut, Order, elastic_plans, plans_from_json, slot_index

# A worker's position: the next entry it would read, and cumulative counters. ``skipped`` counts every bad
# sample and every damaged shard (what data.max_bad_fraction limits); ``bad_shards`` the damaged shards alone.
POSITION_KEYS = ("epoch", "item", "offset", "seen", "skipped", "bad_shards")
COUNTERS = ("seen", "skipped", "bad_shards")
STATE_VERSION = 2


def fresh_position(epoch: int = 0) -> dict:
    return {k: epoch if k == "epoch" else 0 for k in POSITION_KEYS}


def position(d: dict) -> dict:
    return {k: int(d.get(k, 0)) for k in POSITION_KEYS}


def saved_cut(state: dict) -> Cut:
    """The cut of new epochs a state was saved with (no ``blocks``: saved before 2026-12-06, chunks of k)."""
    return Cut(int(state["k"]), int(state.get("blocks", 0)))


def not_elastic(states: list[dict], order: Order) -> Optional[str]:
    """Why these saved states cannot be continued elastically, or None when they can."""
    if not states or any(s.get("version") != STATE_VERSION for s in states):
        return "saved by another version"
    changed = {k: (states[0].get(k), v) for k, v in order.as_dict().items() if states[0].get(k) != v}
    if changed:
        return f"changed: {changed}"
    world = int(states[0]["world_size"])
    if sorted(int(s["rank"]) for s in states) != list(range(world)):
        return f"the states of all {world} rank(s) are needed, got {len(states)}"
    return None


def merge_states(states: list[dict], order: Order) -> tuple[int, dict, dict]:
    """Every old rank's state -> (epoch the new workers start in, plans of the epochs in progress, the old
    counters summed)."""
    world, workers = int(states[0]["world_size"]), int(states[0]["num_workers"])
    positions: list = [None] * (world * workers)
    old_plans: dict = {}
    totals = {c: 0 for c in COUNTERS}
    for s in states:
        old_plans.update(plans_from_json(s.get("plans")))
        for c in COUNTERS:
            totals[c] += int((s.get("carried") or {}).get(c, 0))
        for w, p in enumerate(s["workers"]):
            pos = position(p)
            positions[slot_index(int(s["rank"]), world, w)] = pos
            for c in COUNTERS:
                totals[c] += pos[c]
    first, plans = elastic_plans(order, saved_cut(states[0]), old_plans, positions)
    return first, plans, totals


def resume_stream_state(ckpt_path, own: Optional[dict], world_size: int, num_workers: int):
    """What a rank resumes its data stream from: its own saved state when the layout (processes x workers) is
    unchanged, an exact resume that reads no other rank's file; else every rank's (an elastic resume)."""
    if own and own.get("world_size") == world_size and own.get("num_workers") == max(num_workers, 1):
        return own
    return saved_stream_states(ckpt_path)


def saved_stream_states(ckpt_path) -> Optional[list]:
    """Every rank's saved data-stream state in a checkpoint directory (``rank_*.pt``), for an elastic resume."""
    states = []
    for f in sorted(Path(ckpt_path).glob("rank_*.pt")):
        data = safe_load(f).get("data")  # another rank's file: tensors and plain values only
        if data is not None:
            states.append(data)
    return states or None
