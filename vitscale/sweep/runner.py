"""Run the cells of a sweep: each is a real `vitscale train` (and `vitscale eval`) in a child process.

A cell's folder is its run directory (`OUT/cells/<name>/`: config.yaml, metrics.jsonl, checkpoints) plus
`sweep_cell.json` (status, metrics and the settings it runs with, written before it starts) and `train.log`. A cell
whose `sweep_cell.json` says ok is not run again; a failed or interrupted one is (its training resumes from its own
checkpoints). Both only when the settings match this sweep's (checked before anything runs: sweep/settings.py).

The ``finetune`` evaluation is a second `vitscale train` (fine-tuning is a mode of training, not of eval): the
``finetune_config`` initialised from the cell's run (``model.init``), in ``<cell>/finetune/``, same seed; its
held-out metrics join the cell's as ``finetune/val_*``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from vitscale.logging.metrics import current_name, read_metrics
from vitscale.sweep import cellproc
from vitscale.sweep.grid import Cell

RESULT = "sweep_cell.json"
# The sweep may itself run under a launcher; its children are single runs of their own.
# What distributed/env.py reads a rank from, dropped for the cells: a sweep started under a launcher, srun or mpirun
# must not hand its cells a rank in a larger world (Slurm's job variables other than the task's stay).
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
                 "SLURM_STEP_NUM_TASKS")
LAUNCHER_PREFIXES = ("OMPI_COMM_WORLD_", "PMI_", "MPI_LOCAL")


@dataclass
class SweepPlan:
    """Everything the runner needs besides the cells."""

    config: str
    out: Path
    evals: Sequence[str] = ()
    eval_data: Optional[str] = None
    eval_val_data: Optional[str] = None
    finetune_config: Optional[str] = None
    finetune_overrides: Sequence[str] = ()
    jobs: int = 1
    timeout_s: Optional[float] = None
    extra_env: dict = field(default_factory=dict)
    settings: dict[str, dict] = field(default_factory=dict)  # cell name -> what it computes (sweep/settings.py)

    @property
    def cells_dir(self) -> Path:
        return self.out / "cells"


def cell_dir(plan: SweepPlan, cell: Cell) -> Path:
    return plan.cells_dir / cell.name


def _quiet(overrides: Sequence[str]) -> list[str]:
    """A child's output goes to a log file: no progress bar there unless asked for (train.progress=true)."""
    asked = any(o.partition("=")[0] == "train.progress" for o in overrides)
    return [] if asked else ["train.progress=false"]


def train_overrides(plan: SweepPlan, cell: Cell) -> list[str]:
    overrides = cell.overrides()
    return [*_quiet(overrides), *overrides, f"run.dir={plan.cells_dir}", f"run.name={cell.name}"]


def read_record(path: Path) -> Optional[dict]:
    """A JSON object a cell's folder holds (``sweep_cell.json``, an eval result), or None when there is none. One
    that is damaged (not UTF-8, not JSON, nested past Python's stack, not an object: a kill mid-write, an edit) is
    no record too, said once per file: it must not stop a sweep of many cells at its start."""
    try:
        record = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSON errors are ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
        return note_no_record(path, why)
    return record if isinstance(record, dict) else note_no_record(path, f"a JSON {type(record).__name__}")


_NOTED: set = set()


def note_no_record(path: Path, why: str) -> None:
    """Say once (per file, per process) that a damaged file is taken as no record; returns None, as for none."""
    if str(path) not in _NOTED:
        _NOTED.add(str(path))
        print(f"sweep: warning: {path} is unreadable ({why[:160]}): taken as no record", file=sys.stderr)


def load_result(plan: SweepPlan, cell: Cell) -> Optional[dict]:
    return read_record(cell_dir(plan, cell) / RESULT)


def run_cells(plan: SweepPlan, cells: Sequence[Cell], log: Callable[[str], None] = print) -> list[dict]:
    """Run every cell not already finished (``plan.jobs`` at a time); returns one result dict per cell."""
    results: dict[str, dict] = {}
    todo = []
    for cell in cells:
        done = load_result(plan, cell)
        if done is not None and done.get("status") == "ok":
            # the table is what the files say now (a newer vitscale may read more out of them)
            results[cell.name] = {**done, "metrics": cell_metrics(plan, cell_dir(plan, cell))}
        else:
            todo.append(cell)
    if len(todo) < len(cells):
        log(f"sweep: {len(cells) - len(todo)} of {len(cells)} cells already finished, running {len(todo)}")
    with ThreadPoolExecutor(max_workers=max(1, plan.jobs)) as pool:
        try:
            for result in pool.map(lambda c: _run_one(plan, c, log), todo):
                results[result["name"]] = result
        except BaseException:  # Ctrl-C: the pool's exit waits for the running cells, so stop them first
            cellproc.interrupt_all()
            raise
    return [results[c.name] for c in cells]


def _run_one(plan: SweepPlan, cell: Cell, log: Callable[[str], None]) -> dict:
    folder = cell_dir(plan, cell)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = {"name": cell.name, "group": cell.group, "params": dict(cell.params), "seed": cell.seed,
              "status": "running", "metrics": {}, "overrides": cell.overrides(),
              "settings": plan.settings.get(cell.name)}
    # Recorded before the child starts: a relaunch after a kill must know what the checkpoints here were made with.
    (folder / RESULT).write_text(json.dumps(result, indent=1) + "\n")
    result["status"] = "ok"
    log(f"sweep: {cell.name}: training")
    error = _child(plan, ["train", "--config", plan.config, *train_overrides(plan, cell)], folder / "train.log")
    if error is None and plan.evals:
        log(f"sweep: {cell.name}: evaluating {','.join(plan.evals)}")
        error = _evaluate(plan, folder, cell.seed)
    result["metrics"] = cell_metrics(plan, folder)
    if error is not None:
        result.update(status="failed", error=error)
        log(f"sweep: {cell.name}: FAILED: {error}")
    result["seconds"] = round(time.time() - started, 1)
    (folder / RESULT).write_text(json.dumps(result, indent=1) + "\n")
    return result


FINETUNE = "finetune"
FINETUNE_METRICS = ("val_top1", "val_top5", "val_loss")  # of the fine-tuned model's end-of-run held-out evaluation


def cell_metrics(plan: SweepPlan, folder: Path) -> dict:
    """A cell's numbers from its files: the training's final ones, each requested evaluation's, the fine-tuning's."""
    metrics = training_metrics(folder / "metrics.jsonl")
    for name in plan.evals:
        doc = read_record(folder / "eval" / f"{name}.json") if name != FINETUNE else None
        if doc is not None:
            metrics.update(eval_metrics(doc))
    if FINETUNE in plan.evals:
        done = training_metrics(folder / FINETUNE / "metrics.jsonl")
        metrics.update({f"{FINETUNE}/{k}": v for k, v in done.items() if k in FINETUNE_METRICS})
    return metrics


def _evaluate(plan: SweepPlan, folder: Path, seed: int) -> Optional[str]:
    evals = [e for e in plan.evals if e != FINETUNE]
    if evals:
        args = ["eval", ",".join(evals), str(folder), "--out", str(folder / "eval")]
        if plan.eval_data:
            args += ["--data", plan.eval_data]
        if plan.eval_val_data:
            args += ["--val-data", plan.eval_val_data]
        error = _child(plan, args, folder / "eval.log")
        if error is not None:
            return error
    if FINETUNE in plan.evals:
        args = ["train", "--config", str(plan.finetune_config), *finetune_overrides(plan, folder, seed)]
        return _child(plan, args, folder / "finetune.log")
    return None


def finetune_overrides(plan: SweepPlan, folder: Path, seed: int) -> list[str]:
    return [*_quiet(plan.finetune_overrides), *plan.finetune_overrides, f"model.init={folder}", f"run.dir={folder}",
            f"run.name={FINETUNE}", f"run.seed={seed}"]


def _child(plan: SweepPlan, args: list[str], log_path: Path) -> Optional[str]:
    """Run ``python -m vitscale ARGS``, output to ``log_path``; None on success, else the error's one line."""
    env = launcher_free(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", **child_threads(plan.jobs, env), **plan.extra_env})
    with open(log_path, "a") as out:
        out.write(f"$ vitscale {' '.join(args)}\n")
        out.flush()
        try:
            rc = cellproc.run(args, out, env, plan.timeout_s)  # a child that dies with the sweep
        except subprocess.TimeoutExpired:
            return f"timed out after {plan.timeout_s:g} s (log: {log_path})"
    if rc == 0:
        return None
    return f"{last_error_line(log_path)} (exit {rc}; log: {log_path})"


def launcher_free(env) -> dict:
    """``env`` without what a launcher set to make a process one rank of a world (see LAUNCHER_VARS)."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}


def child_threads(jobs: int, env: dict) -> dict:
    """With ``--jobs N``, each child gets its share of the cores for its torch threads (OMP_NUM_THREADS), unless
    the caller set it: N trainings that each spin up a thread per core oversubscribe the machine (measured on 2
    cores: a demo MAE sharing them with another 2-thread training took 0.6-2.6 s per step, alone 0.22)."""
    if jobs <= 1 or "OMP_NUM_THREADS" in env:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def last_error_line(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "error" in line.lower():
            return line
    return lines[-1] if lines else "no output"


def training_metrics(path: Path) -> dict:
    """The final numbers of a run's metrics.jsonl: last logged train loss and the held-out results."""
    out: dict = {}
    if not path.exists():
        return out
    for record in read_metrics(path, strict=False):
        if "loss" in record:
            out["train_loss"] = record["loss"]
            out["steps"] = record.get("step")
        out.update({k: v for k, v in record.items() if k.startswith("val_") and _is_number(v)})
    return out


# Numbers in an eval result that are settings, not results (they would be columns of +-0 in the table).
SETTINGS = frozenset(("epochs", "batch_size", "lr", "blr", "weight_decay", "seed", "seeds", "reg", "k", "temperature",
                      "repeats", "steps", "params"))


def eval_metrics(doc: dict) -> dict:
    """The results of a ``vitscale eval`` file (the trained model's) as ``<evaluation>/<path>``: numeric leaves
    other than settings; a few-shot curve (``shots`` with ``mean``) as ``<evaluation>/<n>-shot``."""
    results = doc.get("results") or {}
    trained = results.get("trained", next(iter(results.values()), {})) if isinstance(results, dict) else {}
    flat: dict = {}
    _flatten(trained, doc.get("evaluation", "eval"), flat, depth=0)
    return flat


def _flatten(value, prefix: str, out: dict, depth: int) -> None:
    if _is_number(value):
        out[prefix] = value
    elif isinstance(value, dict) and depth < 3:
        shots, means = value.get("shots"), value.get("mean")
        if isinstance(shots, list) and isinstance(means, list) and len(shots) == len(means):
            for n, m in zip(shots, means):
                if _is_number(m):
                    out[f"{prefix}/{n}-shot"] = m
            return
        for k, v in value.items():
            if k not in SETTINGS:
                _flatten(v, f"{prefix}/{current_name(k)}", out, depth + 1)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
