"""``vitscale sweep``: validate every cell, run the unfinished ones, write the table."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from vitscale.config.load import load_config
from vitscale.errors import VitscaleError
from vitscale.eval.names import parse_evaluations
from vitscale.sweep.grid import Cell, SweepError, expand_grid, parse_axes
from vitscale.sweep.report import summarize, write_report
from vitscale.sweep.runner import FINETUNE, SweepPlan, finetune_overrides, load_result, run_cells, train_overrides
from vitscale.sweep.settings import cell_settings, check_recorded, finetune_settings

OWNED_KEYS = ("run.dir", "run.name", "run.seed")  # the sweep sets these for each cell


@dataclass
class SweepOptions:
    config: str
    grid: Sequence[str] = ()
    seeds: int = 1
    out: Optional[str] = None
    evals: Sequence[str] = ()
    eval_data: Optional[str] = None
    eval_val_data: Optional[str] = None
    finetune_config: Optional[str] = None
    finetune_overrides: Sequence[str] = ()
    jobs: int = 1
    shard: tuple[int, int] = (0, 1)
    timeout_s: Optional[float] = None
    dry_run: bool = False
    plot_metrics: Sequence[str] = ()
    extra_env: dict = field(default_factory=dict)


def sweep(opts: SweepOptions, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the sweep; returns the summary written to ``sweep.json``."""
    cells, plan = plan_sweep(opts)
    invalid = validate_cells(plan, cells)
    check_recorded(plan, cells)
    mine = [c for i, c in enumerate(cells) if i % opts.shard[1] == opts.shard[0]]
    if opts.dry_run:
        for c in mine:
            note = f"  INVALID: {invalid[c.name]}" if c.name in invalid else ""
            log(f"{c.name}: {' '.join(train_overrides(plan, c))}{note}")
            if FINETUNE in plan.evals:
                folder = plan.cells_dir / c.name
                then = " ".join(finetune_overrides(plan, folder, c.seed))
                log(f"  then: train --config {plan.finetune_config} {then}")
        return {"cells": len(mine), "failed": []}
    plan.out.mkdir(parents=True, exist_ok=True)
    log(f"sweep: {len(cells)} cells ({len(cells) // opts.seeds} grid points x {opts.seeds} seeds) in {plan.out}")
    runnable = [c for c in mine if c.name not in invalid]
    results = {r["name"]: r for r in run_cells(plan, runnable, log)}
    for name, error in invalid.items():
        results[name] = {"name": name, "status": "failed", "error": error}
    summary = summarize(collect(plan, cells, results))
    header = {"config": opts.config, "grid": opts.grid, "seeds": opts.seeds, "evals": list(opts.evals),
              "cells": len(cells)}
    missing = [m for m in opts.plot_metrics if m not in summary["metrics"]]
    if missing and summary["metrics"]:
        log(f"sweep: --plot {','.join(missing)}: not in the table (it has {', '.join(summary['metrics'])})")
    for path in write_report(summary, plan.out, header, opts.plot_metrics):
        log(f"wrote {path}")
    log((plan.out / "sweep.md").read_text())
    return summary


def plan_sweep(opts: SweepOptions) -> tuple[list[Cell], SweepPlan]:
    if opts.seeds < 1:
        raise SweepError(f"--seeds must be >= 1, got {opts.seeds}")
    if opts.jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {opts.jobs}")
    if opts.timeout_s is not None and not opts.timeout_s > 0:
        raise SweepError(f"--timeout must be > 0 seconds, got {opts.timeout_s}")
    evals = eval_names(opts.evals)
    axes, fixed = parse_axes(opts.grid)
    for item in fixed + [k for k, _ in axes]:
        key = item.partition("=")[0]
        if key in OWNED_KEYS:
            raise SweepError(f"{key} is set by the sweep for each cell; use --out (run.dir/run.name) or --seeds")
    base = load_config(opts.config, fixed)  # a bad shared override fails here, once
    seeds = [base.run.seed + i for i in range(opts.seeds)]
    out = Path(opts.out) if opts.out else Path(base.run.dir) / f"sweep-{Path(opts.config).stem}"
    check_finetune(opts)
    plan = SweepPlan(config=opts.config, out=out, evals=evals, eval_data=opts.eval_data,
                     eval_val_data=opts.eval_val_data,
                     finetune_config=opts.finetune_config, finetune_overrides=list(opts.finetune_overrides),
                     jobs=opts.jobs, timeout_s=opts.timeout_s, extra_env=dict(opts.extra_env))
    return expand_grid(axes, fixed, seeds), plan


def eval_names(evals: Sequence[str]) -> list[str]:
    """--eval's names, aliases expanded (each cell's results are read by name: eval/linear.json, ...), checked
    before any cell trains: a misspelt one failed in every cell, after its training."""
    plain = [e for e in evals if e.strip().lower() != FINETUNE]
    try:
        names = parse_evaluations(",".join(plain)) if plain else []
    except ValueError as e:
        raise SweepError(f"--eval: {e}") from None
    return names + ([FINETUNE] if len(plain) < len(evals) else [])


def check_finetune(opts: SweepOptions) -> None:
    """``--eval finetune`` needs a fine-tuning config, and that config must load (before any cell trains)."""
    if FINETUNE not in opts.evals:
        if opts.finetune_config or opts.finetune_overrides:
            raise SweepError("--finetune-config/--finetune-set are used only with --eval ...,finetune")
        return
    if not opts.finetune_config:
        raise SweepError("--eval finetune needs --finetune-config (e.g. configs/demo_finetune.yaml): the fine-tuning "
                         "run starts from each cell's model (model.init)")
    try:  # model.init is each cell's run dir; validate everything else now, with a placeholder init
        load_config(opts.finetune_config, [*opts.finetune_overrides, "model.init="])
    except (VitscaleError, ValueError) as e:
        raise SweepError(f"--finetune-config {opts.finetune_config}: {str(e).splitlines()[0]}") from None
    owned = [o for o in opts.finetune_overrides if o.partition("=")[0] in (*OWNED_KEYS, "model.init")]
    if owned:
        raise SweepError(f"--finetune-set {owned[0]}: the sweep sets run.dir, run.name, run.seed and model.init "
                         "of each fine-tuning run")


def validate_cells(plan: SweepPlan, cells: Sequence[Cell]) -> dict[str, str]:
    """``{cell name: one-line error}`` for cells whose config does not validate; all invalid is an error. Records
    what each valid cell computes in ``plan.settings`` (from the config loaded here: one load per cell)."""
    invalid: dict[str, str] = {}
    finetune = finetune_settings(plan)
    for cell in cells:
        try:
            cfg = load_config(plan.config, train_overrides(plan, cell))
        except (VitscaleError, ValueError) as e:
            invalid[cell.name] = str(e).splitlines()[0]
        else:
            plan.settings[cell.name] = cell_settings(plan, cfg, finetune)
    if invalid and len(invalid) == len(cells):
        raise SweepError(f"no cell of the sweep has a valid config: {next(iter(invalid.values()))}")
    return invalid


def collect(plan: SweepPlan, cells: Sequence[Cell], fresh: dict[str, dict]) -> list[dict]:
    """Results in grid order: this process's fresh ones, else what other shards left on disk."""
    out = []
    for c in cells:
        r = fresh.get(c.name) or load_result(plan, c) or {"status": "pending", "error": "not run yet"}
        out.append({**r, "name": c.name, "group": c.group, "params": dict(c.params), "seed": c.seed})
    return out
