"""`vitscale <command>`: parse, load config, call one function. Heavy imports happen inside commands.

Imports sit inside the command functions (measured reason: startup): these modules load on every ``vitscale``
call, and on the shared 2-core test machine ``import vitscale.errors`` takes 0.6 s where ``import torch`` takes
8.6 s; ``vitscale --help`` or a bad argument answers at once, and each command imports what it runs.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Optional, Sequence

from vitscale.errors import VitscaleError


def _train(args: argparse.Namespace) -> int:
    if all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK",
                                                   "PMI_RANK")):
        # What follows imports PyTorch, DeepSpeed and the model code: ~10 s, and 60-70 s on the first run after an
        # install (bytecode compiled, DeepSpeed's op builders probed); without this line the wait is silent.
        print(f"vitscale train: checking {args.config} and loading PyTorch and DeepSpeed (up to a minute on the "
              f"first run after an install)", flush=True)
    from vitscale.config.load import load_config
    from vitscale.config.resolve import resolve
    from vitscale.distributed.env import detect_env

    cfg = load_config(args.config, args.overrides)  # validates fully before anything is written
    # and what this launch derives from it (a length in epochs is derived by the trainer, once it has read the data)
    resolve(cfg, detect_env(local_rank_arg=args.local_rank).world_size, need_length=False)
    from vitscale.train import train

    train(cfg, local_rank_arg=args.local_rank, end_group=True)
    return 0


def _make_shards(args: argparse.Namespace) -> int:
    from vitscale.data.make_shards import make_shards

    make_shards(args.src, args.out, maxcount=args.maxcount, maxsize=args.maxsize, resize=args.resize,
                prefix=args.prefix, overwrite=args.overwrite, workers=args.workers, shuffle=not args.no_shuffle,
                seed=args.seed)
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.timm:  # a folder timm.create_model("local-dir:OUT") loads: model.safetensors + config.json
        from vitscale.weights.timm_export import export_timm

        info = export_timm(args.ckpt, args.out, ema=args.ema)
        print(f"wrote {info['path']}/model.safetensors + config.json: {info['tensors']} tensors, "
              f"{info['params'] / 1e6:.2f}M parameters ({info['architecture']}, step {info['step']})")
        return 0
    from vitscale.weights.export import export_weights

    info = export_weights(args.ckpt, args.out, full=args.full, ema=args.ema)
    print(f"wrote {info['path']}: {info['tensors']} tensors, {info['params'] / 1e6:.2f}M parameters "
          f"({info['vitscale_part']}, step {info['step']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitscale", description="Pretrain Vision Transformers at scale.")
    # The deepspeed launcher inserts --local_rank=N before our own arguments.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run from a config")
    t.add_argument("--config", "-c", required=True, help="YAML config file, e.g. configs/demo.yaml")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=600")
    t.set_defaults(func=_train)

    s = sub.add_parser("make-shards", help="image folder / CSV / JSONL list -> WebDataset tar shards + manifest")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    s.add_argument("--maxsize", type=int, default=None, help="bytes per shard")
    s.add_argument("--resize", type=int, default=None, help="resize the shorter side and re-encode as JPEG")
    s.add_argument("--prefix", default="train")
    s.add_argument("--overwrite", action="store_true", help="allow a non-empty OUT")
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: shuffle globally)")
    s.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (recorded in manifest.json)")
    s.set_defaults(func=_make_shards)

    from vitscale.data.cli import add_parser as add_check  # light: argparse only

    add_check(sub)

    e = sub.add_parser("export", help="checkpoint -> one consolidated fp32 safetensors file (timm keys)")
    e.add_argument("ckpt", help="checkpoint dir (runs/x/checkpoints/step_00001000), or a run dir for its latest")
    e.add_argument("out", help="output .safetensors path (with --timm: a folder)")
    e.add_argument("--full", action="store_true", help="keep every part the objective trained (default: the part "
                                                      "it exports, e.g. an MAE's encoder without the decoder)")
    e.add_argument("--ema", action="store_true", help="the model EMA's weights (train.ema_decay) instead of the "
                                                      "trained weights")
    e.add_argument("--timm", action="store_true", help="write OUT as a folder timm loads without vitscale "
                                                       "(model.safetensors + config.json; local-dir:OUT)")
    e.set_defaults(func=_export)

    from vitscale.analysis.cli import add_parser as add_analyze  # light: argparse only

    add_analyze(sub)
    from vitscale.eval.cli import add_parser as add_eval  # light: argparse only

    add_eval(sub)
    from vitscale.sweep.cli import add_parser as add_sweep  # light: argparse only

    add_sweep(sub)

    from vitscale.bench.cli import add_parsers as add_tools  # bench, plan, plot; light: argparse only

    add_tools(sub)
    return p


def _interleaved(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """argparse fills a ``nargs="*"`` positional (key=value overrides, a sweep's grid) from one run of arguments
    only: ``sweep --config C a=1 --seeds 2 b=2`` leaves ``b=2`` over. Such leftovers join that positional, in
    order; what remains (unknown options) is returned."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subparsers.choices[args.command]
    rest = [a for a in sub._actions if not a.option_strings and a.nargs == "*"]
    if not rest:
        return extra
    values = getattr(args, rest[0].dest)
    values.extend(x for x in extra if not x.startswith("-"))
    return [x for x in extra if x.startswith("-")]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    extra = _interleaved(parser, args, extra)
    # Launchers may also append --local_rank after the subcommand; accept it there too.
    for item in list(extra):
        if item.startswith(("--local_rank", "--local-rank")):
            extra.remove(item)
            if "=" in item:
                args.local_rank = int(item.split("=", 1)[1])
    if extra:
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (VitscaleError, FileNotFoundError, ValueError) as e:
        if os.environ.get("VITSCALE_DEBUG"):
            raise
        print(f"vitscale: error: {one_line(e)}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``vitscale`` program (its console script and ``python -m vitscale``): :func:`main`, then exit.

    Once the command has returned, ``gc.freeze()``: torch's optimizers import torch._dynamo (and sympy with it),
    and the interpreter's last garbage collection walked all of those objects at every exit, 0.9-1.4 s of every
    training process on the 2-core test machine. The command has closed its files; atexit handlers and the release
    of everything else still run. (Not in :func:`main`, which tests also call inside a longer-lived process.)"""
    code = main()
    gc.freeze()
    sys.exit(code)


def one_line(error: BaseException) -> str:
    """The user-facing line of an error; one re-raised from a DataLoader worker carries the worker's whole
    traceback in its message, whose last line is the original error."""
    checked = getattr(error, "errors", None)
    if callable(checked) and hasattr(error, "title"):  # pydantic's: the first line alone names no field
        return _validation_line(error.title, checked())
    lines = str(error).strip().splitlines() or [type(error).__name__]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return lines[0]



def _validation_line(title: str, problems: list) -> str:
    """A pydantic validation error (DeepSpeed checks its config with pydantic) as one line naming each field."""
    where = " (engine.ds_config)" if title.startswith("DeepSpeed") else ""
    said = "; ".join(f"{'.'.join(map(str, p.get('loc', ())))}: {p.get('msg', '')} (got {p.get('input')!r})"
                     for p in problems)
    return f"{title}{where} refused: {said}"


if __name__ == "__main__":
    run()
