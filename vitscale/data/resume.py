"""Resuming the data stream: positions, every rank's saved state, and merging them for another layout."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from vitscale.distributed.safeload import safe_load
from vitscale.errors import CheckpointReadError

from vitscale.data.order import MAX_EPOCH_SPAN, Cut, Order, elastic_plans, plans_from_json, slot_index

# A worker's position: the next entry it would read, and cumulative counters. ``skipped`` counts every bad
# sample and every damaged shard (what data.max_bad_fraction limits); ``bad_shards`` the damaged shards alone.
POSITION_KEYS = ("epoch", "item", "offset", "seen", "skipped", "bad_shards")
COUNTERS = ("seen", "skipped", "bad_shards")
STATE_VERSION = 2
# Bounds of a rank state's numbers (read_rank_state): a resume allocates per rank x worker and loops per epoch, so a
# damaged file's 10^11 ranks or 10^12 epochs must be refused, not believed.
_MAX_INT = 1 << 53
_MAX_WORKERS = 1 << 12  # DataLoader workers of one rank
_MAX_ITEMS = 1 << 24  # blocks in a saved epoch plan
_RANK_FILE = re.compile(r"rank_(\d{5,})\.pt")


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
    states, spans = [], {}
    for f in sorted(Path(ckpt_path).glob("rank_*.pt")):
        data = read_rank_state(f).get("data")  # another rank's file: tensors and plain values only, checked
        if data is not None:
            states.append(data)
            for name, epochs in _epochs(data).items():
                lo, hi = spans.get(name, (min(epochs), max(epochs)))
                spans[name] = (min(lo, *epochs), max(hi, *epochs))
    for name, (lo, hi) in spans.items():
        if hi - lo > MAX_EPOCH_SPAN:
            raise CheckpointReadError(f"damaged rank states in {ckpt_path}: readers{name} at epochs {lo} and {hi}, "
                                      f"more than {MAX_EPOCH_SPAN} apart (resume from an earlier checkpoint)")
    return states or None


def read_rank_state(path: Path) -> dict:
    """A checkpoint's ``rank_NNNNN.pt`` (RNG states, data-stream position, counters), loaded safely and checked, so
    that a damaged or hand-made file is one :class:`CheckpointReadError` naming it, never a crash (or a 10^11-entry
    list) somewhere in the resume."""
    path = Path(path)
    state = safe_load(path)
    match = _RANK_FILE.fullmatch(path.name)
    try:
        check_rank_state(state, len(list(path.parent.glob("rank_*.pt"))), int(match[1]) if match else None)
    except ValueError as e:
        raise CheckpointReadError(f"damaged rank state {path}: {e} (resume from an earlier checkpoint: "
                                  f"train.resume=PATH)") from None
    if state.get("rng") == {}:  # holds nothing: as if absent (the trainer then seeds its RNG afresh)
        del state["rng"]
    return state


def check_rank_state(state: Any, ranks: int, rank: Optional[int] = None) -> None:
    """Raise ``ValueError`` saying what is wrong with a rank state; ``ranks``: the rank files of its checkpoint,
    ``rank``: the rank its file name says (None: not known)."""
    if not isinstance(state, dict):
        raise ValueError(f"a {type(state).__name__}, not a dict")
    _int(state.get("decode_failures", 0), "decode_failures")
    rng = state.get("rng", {})
    if not isinstance(rng, dict) or set(rng) - {"torch", "cuda"} or (rng and "torch" not in rng):
        raise ValueError("rng is not a dict of 'torch' (and 'cuda') generator states")
    for key, value in rng.items():
        _rng(value, key)
    data = state.get("data")
    if data is None:
        return
    if not isinstance(data, dict):
        raise ValueError(f"data is a {type(data).__name__}, not a dict")
    if data.get("mix"):
        _layout(data, "data", ranks, rank)
        for what in ("origin", "batch_size", "batches"):
            _int(data.get(what), f"data.{what}")
        sources = data.get("sources")
        if not isinstance(sources, dict) or not all(isinstance(v, dict) for v in sources.values()):
            raise ValueError("data.sources is not a dict of source states")
        for name, part in sources.items():
            _stream(part, f"data.sources[{str(name)[:40]!r}]", ranks, rank)
    else:
        _stream(data, "data", ranks, rank)


def _int(value: Any, what: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what} is {str(value)[:40]!r}, not an integer in {lo}..{hi}")
    return value


def _rng(value: Any, which: str) -> None:
    """A generator state this process can set: checked by setting it, then putting its own state back."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1 or \
            value.numel() > 1 << 20:
        raise ValueError(f"rng.{which} is not a generator state (a 1-d uint8 tensor)")
    if which == "cuda" and not torch.cuda.is_available():
        return  # set only where a GPU is (state.set_rng_state)
    get, put = (torch.get_rng_state, torch.set_rng_state) if which == "torch" else \
        (torch.cuda.get_rng_state, torch.cuda.set_rng_state)
    own = get()
    try:
        put(value)
    except RuntimeError as e:  # e.g. "Invalid mt19937 state"
        raise ValueError(f"rng.{which} is not a generator state ({e})") from None
    finally:
        put(own)


def _layout(data: dict, what: str, ranks: int, rank: Optional[int]) -> None:
    world = _int(data.get("world_size"), f"{what}.world_size", 1)
    if world != ranks:
        raise ValueError(f"{what}.world_size is {world} but the checkpoint has {ranks} rank file(s)")
    got = _int(data.get("rank"), f"{what}.rank", 0, world - 1)
    if rank is not None and got != rank:
        raise ValueError(f"{what}.rank is {got}, its file is rank {rank}'s")
    _int(data.get("num_workers"), f"{what}.num_workers", 1, _MAX_WORKERS)


def _stream(data: dict, what: str, ranks: int, rank: Optional[int]) -> None:
    """One stream's state (``TrainLoader.state_dict``): layout, cut, counters, positions and plans. A state of
    another version is only read for its workers' epochs (the stream then starts the next epoch)."""
    if data.get("version") != STATE_VERSION:
        workers = data.get("workers") or []
        if not isinstance(workers, list) or not all(isinstance(p, dict) for p in workers):
            raise ValueError(f"{what}.workers is not a list of positions")
        for w, pos in enumerate(workers):
            _int(pos.get("epoch", 0), f"{what}.workers[{w}].epoch")
        return
    _layout(data, what, ranks, rank)
    _int(data.get("k"), f"{what}.k", 1)
    _int(data.get("blocks", 0), f"{what}.blocks")
    _int(data.get("batches"), f"{what}.batches")
    carried = data.get("carried") or {}
    if not isinstance(carried, dict):
        raise ValueError(f"{what}.carried is not a dict")
    for c in COUNTERS:
        _int(carried.get(c, 0), f"{what}.carried.{c}")
    workers = data.get("workers")
    if not isinstance(workers, list) or len(workers) != data["num_workers"]:
        raise ValueError(f"{what}.workers is not a list of {data['num_workers']} position(s)")
    for w, pos in enumerate(workers):
        if not isinstance(pos, dict):
            raise ValueError(f"{what}.workers[{w}] is not a dict")
        for k in POSITION_KEYS:
            _int(pos.get(k, 0), f"{what}.workers[{w}].{k}")
    epochs = [p.get("epoch", 0) for p in workers]
    if max(epochs) - min(epochs) > MAX_EPOCH_SPAN:
        raise ValueError(f"{what}.workers are at epochs {min(epochs)} and {max(epochs)}, more than "
                         f"{MAX_EPOCH_SPAN} apart")
    plans = data.get("plans") or []
    if not isinstance(plans, list) or len(plans) > MAX_EPOCH_SPAN + 1:
        raise ValueError(f"{what}.plans is not a list of epoch plans")
    for plan in plans:
        if not isinstance(plan, (list, tuple)) or len(plan) not in (3, 4) or not isinstance(plan[2], (list, tuple)) \
                or len(plan[2]) > _MAX_ITEMS:
            raise ValueError(f"{what}.plans holds {str(plan)[:40]!r}, not [epoch, k, items, blocks]")
        _int(plan[0], f"{what}.plans epoch")
        _int(plan[1], f"{what}.plans k", 1)
        _int(plan[3] if len(plan) == 4 else 0, f"{what}.plans blocks")
        for item in plan[2]:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ValueError(f"{what}.plans item {str(item)[:40]!r} is not [block, start]")
            _int(item[0], f"{what}.plans block")
            _int(item[1], f"{what}.plans start")


def _epochs(data: dict) -> dict:
    """{source ("" for one stream, " of source NAME" in a mix): the epochs of its reader positions}."""
    parts = {f" of source {str(n)[:40]!r}": s for n, s in data["sources"].items()} if data.get("mix") else {"": data}
    epochs = {name: [p.get("epoch", 0) for p in s.get("workers") or []] for name, s in parts.items()}
    return {name: e for name, e in epochs.items() if e}
