"""Sharded checkpoints that are never half-used.

Layout under `runs/<name>/checkpoints/`:
  step_00001000/            DeepSpeed's shards (every rank writes its own) plus
    rank_00000.pt ...       per-rank state: RNG states, data-stream position (small, weights_only-loadable)
    trainer_state.json      step, samples seen, tracker id, resolved config (rank 0)
    COMPLETE                written by rank 0 only after every rank finished; lists every file and its size
    universal/              only after a resume at another world size or ZeRO stage: DeepSpeed's universal
                            layout of the same step, converted once by rank 0
  latest                    the tag of the newest complete checkpoint (replaced atomically)

A directory without COMPLETE, or whose files no longer match COMPLETE's sizes (truncated copy), is never
loaded: resume falls back to the previous complete checkpoint with a warning.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vitscale import faults
from vitscale.distributed import engine as eng
from vitscale.distributed.conversion import convert_to_universal
from vitscale.distributed.safeload import safe_load
from vitscale.distributed.universal import LAYOUT_VERSION
from vitscale.errors import CheckpointReadError, CheckpointWriteError

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
UNIVERSAL = "universal"  # sub-directory holding a checkpoint converted for another world size / ZeRO stage


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


TRAINER_STATE = "trainer_state.json"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_marker(path: Path) -> dict:
    """The COMPLETE marker of the checkpoint at PATH, the one reader of it: {} when it is missing or unreadable (an
    interrupted save or a damaged file; :func:`is_complete` says which)."""
    try:
        marker = json.loads((Path(path) / COMPLETE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return marker if isinstance(marker, dict) else {}


def is_complete(path: Path) -> tuple[bool, str]:
    """(ok, reason): the COMPLETE marker exists and every listed file is present with its recorded size."""
    if not (path / COMPLETE).is_file():
        return False, "no COMPLETE marker (a save was interrupted)"
    files = read_marker(path).get("files")
    if files is None:
        return False, "unreadable COMPLETE marker"
    if not isinstance(files, dict) or not all(type(n) is int for n in files.values()):
        return False, "unreadable COMPLETE marker (not a list of files and sizes)"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return False, f"missing file {rel}"
        if f.stat().st_size != size:
            return False, f"file {rel} is {f.stat().st_size} bytes, expected {size} (truncated?)"
    return True, ""


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json, checked before anything uses it: an object with an integer ``step`` >= 0,
    a ``config`` of sections and numbers where numbers belong; else :class:`CheckpointReadError` naming the file."""
    f = Path(path) / "trainer_state.json"
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointReadError(f"{f} is unreadable: {type(e).__name__}: {str(e)[:200]}".splitlines()[0]) from None
    if not isinstance(state, dict):
        raise CheckpointReadError(f"{f} is not a vitscale trainer state (a JSON object)")
    config = state.get("config", {})
    ints = {k: state[k] for k in ("step", "samples", "world_size", "nonfinite_losses", "rollbacks") if k in state}
    bad = [k for k, v in ints.items() if type(v) is not int or v < (1 if k == "world_size" else 0)]
    bad += [] if "step" in state else ["step (missing)"]
    bad += [] if isinstance(config, dict) and all(isinstance(v, dict) for v in config.values()) else ["config"]
    bad += [] if type(state.get("lr_scale", 1.0)) in (int, float) else ["lr_scale"]
    bad += [] if isinstance(state.get("history", []), list) else ["history"]
    if bad:
        raise CheckpointReadError(f"{f} is not a vitscale trainer state: bad {', '.join(bad)}")
    return state


class CheckpointManager:
    """Save/find/load/prune checkpoints; every rank calls save and load (DeepSpeed shards per rank)."""

    def __init__(self, ckpt_dir: Path, rank: int, keep_last: int = 2,
                 read_rank: Callable[[Path], dict] = safe_load):
        self.dir = Path(ckpt_dir)
        self.rank = rank
        self.keep_last = keep_last
        # how a rank_NNNNN.pt is read: the trainer passes data/resume.py:read_rank_state, which checks the
        # data-stream state it holds (that layer's knowledge, above this one)
        self.read_rank = read_rank
        self.last_save: dict[str, float] = {}  # rank 0: seconds and bytes of the newest save (all ranks' shards)

    def steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := TAG_RE.match(p.name)))

    def save(self, engine: "eng.Engine", step: int, trainer_state: dict, rank_state: dict) -> Path:
        """Every rank writes its shards and state; rank 0 then marks the checkpoint complete and prunes old ones.

        A write that fails (disk full, unwritable directory) on any rank fails the save on every rank with
        :class:`CheckpointWriteError`; the partial directory is removed (it would never be used, and it holds the
        space), and the previous complete checkpoint is untouched."""
        tag = tag_for(step)
        path = self.dir / tag
        if self.rank == 0 and path.exists():
            self._set_aside(path)
        eng.barrier()
        start = time.perf_counter()
        error = ""
        try:
            engine.save(self.dir, tag, client_state={"step": step})
            faults.inject("ckpt_write", rank=self.rank, step=step)
            torch.save(rank_state, path / f"rank_{self.rank:05d}.pt")
        except OSError as e:
            error = str(e)
        self._agree(error, path)  # every rank has written its shards
        if self.rank == 0:
            try:
                (path / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1, default=str))
                files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
                # the write time travels with the checkpoint: a resume compares step + write with the grace
                self.last_save = {"seconds": time.perf_counter() - start, "bytes": sum(files.values())}
                _write_atomic(path / COMPLETE, json.dumps({"step": step, "files": files,
                                                          "write_s": round(self.last_save["seconds"], 3)}))
                _write_atomic(self.dir / "latest", tag + "\n")
                self._prune()
            except OSError as e:
                error = str(e)
        self._agree(error, path)
        return path

    def rewind(self, step: int) -> None:
        """Rank 0: make STEP's checkpoint the run's newest again: ``latest`` points at it and every later checkpoint
        is removed, so the next launch resumes STEP (``vitscale preflight`` ends a branch it is done with so)."""
        keep = self.dir / tag_for(step)
        ok, why = is_complete(keep)
        if not ok:
            raise FileNotFoundError(f"cannot rewind to {keep}: not a complete checkpoint ({why})")
        _write_atomic(self.dir / "latest", tag_for(step) + "\n")  # first: an interrupted rewind leaves it valid
        for later in (s for s in self.steps() if s > step):
            shutil.rmtree(self.dir / tag_for(later), ignore_errors=True)

    def branch(self, step: int, resumed: Optional[Path] = None) -> list[Path]:
        """Rank 0, after a resume at STEP: this run's complete checkpoints of later steps are another
        branch of its history (train.resume=PATH named an older one), so they are set aside (renamed, never
        deleted) and ``latest`` names the newest one left. Otherwise keep_last would prune the new branch's first
        checkpoints as the oldest, and the next train.resume=auto would go back to the old branch. ``resumed``, a
        checkpoint of this run set aside before (``step_N.replaced-T``), keeps its name (other ranks read it still),
        the checkpoint named ``step_N`` is set aside too (pruning could have deleted it), and ``latest`` names the
        resumed one, which train.resume=auto then continues. Returns where they went."""
        aside = resumed is not None and Path(resumed).parent.resolve() == self.dir.resolve() \
            and Path(resumed).name != tag_for(step)
        complete = [s for s in self.steps() if is_complete(self.dir / tag_for(s))[0]]
        moved = [self._set_aside(self.dir / tag_for(s), warn=False) for s in complete
                 if s > step or (aside and s == step)]
        if aside:
            _write_atomic(self.dir / "latest", Path(resumed).name + "\n")
            return moved
        left = [s for s in complete if s <= step]
        if moved and left:
            _write_atomic(self.dir / "latest", tag_for(left[-1]) + "\n")
        elif moved:
            (self.dir / "latest").unlink(missing_ok=True)
        return moved

    def _agree(self, error: str, path: Path) -> None:
        """Collective: raise on every rank, naming the rank that failed and why, if the write failed on any."""
        failure = eng.first_failure(error)
        if failure is None:
            return
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            for tmp in self.dir.glob(".latest.tmp*"):
                tmp.unlink(missing_ok=True)
        previous = next((self.dir / tag_for(s) for s in reversed(self.steps())
                         if s != int(TAG_RE.match(path.name).group(1)) and is_complete(self.dir / tag_for(s))[0]),
                        None)
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        rank, cause = failure
        where = f" (on rank {rank})" if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 \
            else ""
        raise CheckpointWriteError(f"could not write checkpoint {path}{where}: {cause}; {kept}")

    def _set_aside(self, path: Path, warn: bool = True) -> Optional[Path]:
        """Make room for a new save at an existing tag: an incomplete attempt is removed; a complete checkpoint
        (resumed from an older one with train.resume=PATH) is renamed, never deleted. Returns its new path."""
        if not is_complete(path)[0]:
            shutil.rmtree(path)
            return None
        stamp = int(time.time())
        aside = path.with_name(f"{path.name}.replaced-{stamp}")
        for n in range(2, 1000):  # the same tag set aside twice within a second: os.replace cannot merge folders
            if not aside.exists():
                break
            aside = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
        if warn:
            warnings.warn(f"{path} is a complete checkpoint from an earlier branch of this run: moved to {aside}",
                          stacklevel=3)
        os.replace(path, aside)
        return aside

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        complete = [s for s in self.steps() if is_complete(self.dir / tag_for(s))[0]]
        best = self.dir / "best"  # train.eval_every's best checkpoint is kept whatever its age
        keep = best.read_text().strip() if best.is_file() else None
        for s in complete[:-self.keep_last]:
            if tag_for(s) == keep:
                continue
            shutil.rmtree(self.dir / tag_for(s), ignore_errors=True)

    def find(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from: "never" -> None, a path -> that path, "auto" -> newest complete."""
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            if not is_complete(path)[0]:
                raise FileNotFoundError(f"train.resume={resume}: {_not_a_checkpoint(path)}")
            return path
        resumed = self._resumed_aside()
        if resumed is not None:
            return resumed
        for step in reversed(self.steps()):
            path = self.dir / tag_for(step)
            ok, why = is_complete(path)
            if ok:
                return path
            if self.rank == 0:
                warnings.warn(f"skipping checkpoint {path}: {why}; trying the previous one", stacklevel=2)
        return None

    def _resumed_aside(self) -> Optional[Path]:
        """A set-aside checkpoint of this run that ``latest`` names (a branch resumed from it, see :meth:`branch`),
        when complete and not older than every ``step_N`` checkpoint: the branch in progress, until its first save."""
        named = _latest_in(self.dir) if self.dir.is_dir() else None
        if named is None or TAG_RE.match(named.name) or named.parent != self.dir or not is_complete(named)[0]:
            return None
        steps = [s for s in self.steps() if is_complete(self.dir / tag_for(s))[0]]
        step = read_trainer_state(named).get("step", -1)
        return named if not steps or step >= steps[-1] else None

    def prepare(self, path: Path, world_size: int, zero_stage: int, sub_group_size: Optional[int] = None) -> bool:
        """Whether `path` must be resumed through DeepSpeed's universal layout, i.e. it was written at another
        world size or ZeRO stage, or (ZeRO-3) another optimizer ``sub_group_size``. If so, rank 0 converts it once
        into ``path/universal/`` (kept for later resumes, pruned with the checkpoint). Collective: every rank calls
        it before the engine is built, because DeepSpeed reads the universal layout only when its config says so."""
        state = read_trainer_state(path)
        old_world = int(state.get("world_size", world_size))
        old_stage = int(state.get("config", {}).get("engine", {}).get("zero_stage", zero_stage))
        # ZeRO-3 keeps one flat optimizer state per sub-group: DeepSpeed cannot load it under another sub-group size
        old_group = state.get("zero3_sub_group_size") if old_stage == zero_stage == 3 else None
        regrouped = isinstance(old_group, int) and sub_group_size is not None and old_group != sub_group_size
        if ((old_world, old_stage) == (world_size, zero_stage) and not regrouped) or old_stage == zero_stage == 0:
            return False  # same layout; or ZeRO-0, whose files hold whole copies for any world size
        if 0 in (old_stage, zero_stage):
            raise ValueError(f"{path} was written with engine.zero_stage={old_stage}; it cannot be resumed with "
                             f"engine.zero_stage={zero_stage} (only ZeRO 1-3 checkpoints convert between stages)")
        target = path / UNIVERSAL
        error = ""
        if self.rank == 0 and not _current_universal(target):
            why = (f"optimizer sub_group_size {old_group} -> {sub_group_size}" if regrouped and
                   (old_world, old_stage) == (world_size, zero_stage) else f"world size {world_size}, ZeRO-{zero_stage}")
            print(f"converting {path} (world size {old_world}, ZeRO-{old_stage}) to DeepSpeed's universal layout "
                  f"to resume at {why}", flush=True)
            marker = json.dumps({"from_world_size": old_world, "from_stage": old_stage, "layout": LAYOUT_VERSION})
            error = convert_to_universal(path, target, checkpoint_bytes(path), old_world, old_stage,
                                         lambda folder: _write_atomic(folder / COMPLETE, marker))
        if eng.any_rank(bool(error)):
            raise CheckpointReadError(f"could not convert {path} to the universal layout: "
                                      f"{error or 'failed on rank 0'}")
        if not (target / COMPLETE).is_file():
            raise FileNotFoundError(f"{target} is not visible on rank {self.rank}: resuming at another world size "
                                    "needs the checkpoint on a filesystem every node can read")
        return True

    def load(self, engine: "eng.Engine", path: Path, universal: bool = False) -> tuple[dict, Optional[dict]]:
        """Load shards into `engine`; returns (trainer_state, this rank's state or None if absent).

        A rank that did not exist when the checkpoint was written (more processes now) gets rank 0's data-stream
        state without its RNG: the stream sees the layout changed and starts a fresh epoch on every rank alike."""
        if universal:
            engine.load(path, UNIVERSAL)
        else:
            engine.load(path.parent, path.name)
        trainer_state = read_trainer_state(path)
        rank_file = path / f"rank_{self.rank:05d}.pt"
        rank_state: Optional[dict[str, Any]] = None
        if rank_file.is_file():
            rank_state = self.read_rank(rank_file)  # checked: a damaged state is one line
        elif (path / "rank_00000.pt").is_file():
            data = self.read_rank(path / "rank_00000.pt").get("data")
            rank_state = {"data": data} if data is not None else None
        return trainer_state, rank_state


def write_seconds(path: Path) -> Optional[float]:
    """How long the checkpoint at PATH took to write (every rank's shards), as recorded in its COMPLETE marker."""
    value = read_marker(path).get("write_s")
    return float(value) if isinstance(value, (int, float)) else None


def checkpoint_bytes(path: Path) -> int:
    """The checkpoint's size, from the file sizes its COMPLETE marker records (no walk of the directory)."""
    return sum(v for v in read_marker(path).get("files", {}).values() if isinstance(v, int))


def _current_universal(target: Path) -> bool:
    """TARGET is a complete universal conversion in today's layout (every ZeRO stage 1-3 reads it)."""
    return read_marker(target).get("layout") == LAYOUT_VERSION


def _latest_in(path: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names in a checkpoints/ folder PATH or a run folder PATH, if it has one. A damaged
    ``latest`` (not UTF-8, or a name the filesystem refuses: too long) is warned about, naming it, and taken as
    absent: the newest complete checkpoint is used, as for a run copied without it."""
    for base in (path, path / "checkpoints"):
        marker = base / "latest"
        if marker.is_file():
            try:
                named = base / marker.read_bytes().decode("utf-8").strip()
                named.is_dir()  # ENAMETOOLONG and kin show here, not later inside is_complete
            except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
                why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
                warnings.warn(f"{marker} is unreadable ({why}): looking for the newest complete checkpoint instead",
                              stacklevel=3)
                return None
            return named
    return None


def _newest_complete(path: Path) -> Optional[Path]:
    """The complete checkpoint of the highest step in a checkpoints/ folder PATH or a run folder PATH."""
    for base in (path, path / "checkpoints"):
        steps = sorted((int(m.group(1)), d) for d in (base.iterdir() if base.is_dir() else [])
                       if (m := TAG_RE.match(d.name)) and is_complete(d)[0])
        if steps:
            return steps[-1][1]
    return None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint dir, a checkpoints/ dir or a run dir -> a complete checkpoint: the one ``latest`` names, else
    (a run copied without ``latest``, or the checkpoint it names damaged since) the newest complete one, said."""
    latest = _latest_in(Path(path))
    if latest is not None:
        complete, why = is_complete(latest)
        if complete:  # the normal path: only the checkpoint latest names is looked at
            return latest
    # only now every checkpoint's files are looked at (slow on a network filesystem)
    newest = _newest_complete(Path(path))
    if newest is not None:
        if latest is not None:
            warnings.warn(f"{latest}, which {path}'s latest names, is not a complete checkpoint ({why}): using "
                          f"{newest}", stacklevel=2)
        return newest
    path = latest or Path(path)
    if not is_complete(path)[0]:
        raise FileNotFoundError(_not_a_checkpoint(path))
    return path


def _looks_like_checkpoint(path: Path) -> bool:
    """A checkpoint folder, complete or not: named by its step, or holding what a save writes first."""
    return (bool(TAG_RE.match(path.name)) or any((path / f).exists() for f in (COMPLETE, TRAINER_STATE))
            or any(path.glob("*.pt")))


def _not_a_checkpoint(path: Path) -> str:
    """Why PATH (not a complete checkpoint) is none, in one line: an interrupted save is told apart from a path
    that was never a checkpoint (missing, a file, a run or checkpoints/ folder with nothing saved yet)."""
    if not path.exists():
        return f"checkpoint not found: {path}"
    if not path.is_dir():
        return f"{path} is a file, not a checkpoint folder"
    latest = _latest_in(path)
    if latest is not None:  # a run dir where one checkpoint is wanted (train.resume=PATH)
        return f"{path} is a run folder, not a checkpoint (its latest: {latest})"
    if not _looks_like_checkpoint(path):
        return f"no checkpoint in {path} (the run has not saved one yet)"
    return f"{path} is not a complete checkpoint ({is_complete(path)[1]})"
