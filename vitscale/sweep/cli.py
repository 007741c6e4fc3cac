"""The ``sweep`` subcommand: ``add_parser(subparsers)`` registers it (argparse only: imports stay light).

Imports sit inside the command functions (measured reason: startup): these modules load on every ``vitscale``
call, and on the shared 2-core test machine ``import vitscale.errors`` takes 0.6 s where ``import torch`` takes
8.6 s; ``vitscale --help`` or a bad argument answers at once, and each command imports what it runs.
"""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  vitscale sweep --config configs/demo.yaml model.pos_embed=learn,sincos,none --seeds 3 --out sweeps/pos
  vitscale sweep --config configs/demo_mae.yaml objective.mask_ratio=0.25,0.5,0.75,0.9 train.steps=300 \\
      --seeds 2 --eval linear,knn,finetune --eval-data demo:digits \\
      --finetune-config configs/demo_finetune.yaml --finetune-set train.steps=200 --out sweeps/mask --jobs 2
A KEY with one value is applied to every cell; a KEY with several (comma-separated) is an axis of the grid.
Quote a value that holds a comma: 'model.freeze="patch_embed,blocks.0"' is one value.
Run the same command again to resume: finished cells are kept, failed or unfinished ones run (again). A relaunch
into the same OUT with other settings for its cells (shared overrides, base config, evals) is refused: use a new OUT.
--shard K/N runs every N-th cell (for N machines or processes sharing OUT); any of them can print the table."""


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= K < N")
    return k, n


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("sweep", help="a grid of trainings (and evals) over config values and seeds",
                              description="Train every combination of the given config values, for several seeds; "
                                          "write sweep.json, sweep.md (mean ± std over seeds) and sweep.png.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", "-c", required=True, help="base YAML config, e.g. configs/demo.yaml")
    s.add_argument("grid", nargs="*", metavar="KEY=V1,V2", help="axes of the grid (and shared key=value overrides)")
    s.add_argument("--seeds", type=int, default=1, help="seeds per grid point: run.seed, run.seed+1, ... (default 1)")
    s.add_argument("--out", "-o", default=None, help="sweep folder (default: runs/sweep-<config name>)")
    s.add_argument("--eval", default="", help="evaluations after each training, as for `vitscale eval` "
                                              "(e.g. linear,knn,finetune)")
    s.add_argument("--eval-data", default=None, help="--data for the evaluations (default: the run's own data)")
    s.add_argument("--eval-val-data", default=None,
                   help="--val-data for the evaluations (default: demo:X:val for demo:X, else the run's own)")
    s.add_argument("--finetune-config", default=None,
                   help="with --eval ...,finetune: the fine-tuning config, run with model.init=<each cell's run>")
    s.add_argument("--finetune-set", action="append", default=[], metavar="KEY=V",
                   help="an override for the fine-tuning runs (repeatable), e.g. train.steps=200")
    s.add_argument("--jobs", "-j", type=int, default=1, help="cells trained at the same time (default 1)")
    s.add_argument("--shard", type=_shard, default=(0, 1), help="K/N: run only cells K, K+N, ... (default 0/1)")
    s.add_argument("--timeout", type=float, default=None, help="seconds a cell may take before it counts as failed")
    s.add_argument("--plot", default="", metavar="M1,M2",
                   help="metrics to draw in sweep.png (default: the table's first four), e.g. fewshot/5-shot")
    s.add_argument("--dry-run", action="store_true", help="print the cells and their overrides, run nothing")
    s.set_defaults(func=run_sweep_command)
    return s


def run_sweep_command(args: argparse.Namespace) -> int:
    from vitscale.sweep.run import SweepOptions, sweep

    opts = SweepOptions(config=args.config, grid=args.grid, seeds=args.seeds, out=args.out,
                        evals=[e for e in args.eval.split(",") if e.strip()], eval_data=args.eval_data,
                        eval_val_data=args.eval_val_data, finetune_config=args.finetune_config,
                        finetune_overrides=args.finetune_set, jobs=args.jobs,
                        shard=args.shard, timeout_s=args.timeout, dry_run=args.dry_run,
                        plot_metrics=[m for m in args.plot.split(",") if m.strip()])
    summary = sweep(opts)
    return 1 if summary.get("failed") else 0
