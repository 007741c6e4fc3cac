"""``bench``, ``plan``, ``preflight`` and ``plot`` subcommands: ``add_parsers(subparsers)`` registers them
(argparse only here; the heavy imports happen when a command runs).

Imports sit inside the command functions (measured reason: startup): these modules load on every ``vitscale``
call, and on the shared 2-core test machine ``import vitscale.errors`` takes 0.6 s where ``import torch`` takes
8.6 s; ``vitscale --help`` or a bad argument answers at once, and each command imports what it runs.
"""
from __future__ import annotations

import argparse
import datetime
import sys


def add_parsers(subparsers) -> None:
    for add in (_add_bench, _add_plan, _add_preflight, _add_plot):
        add(subparsers)


def _add_bench(subparsers) -> None:
    b = subparsers.add_parser(
        "bench", help="img/s, MFU and memory: model alone (vs timm), engine step, loader, full step; or data loaders",
        description="Throughput of the configured training on this machine. --what picks the modes: model "
                    "(ours vs timm, synthetic batch), engine (our DeepSpeed step, synthetic batch), loader, step "
                    "(loader + engine); or 'data' for the loader vs ImageFolder vs decode-only benchmark (no config).")
    b.add_argument("--config", "-c", default=None, help="YAML config (required unless --what data)")
    b.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.batch_size=64")
    b.add_argument("--what", default="model,engine,loader,step",
                   help="comma-separated modes: model, engine, loader, step (default: all), or 'data'")
    b.add_argument("--iters", type=int, default=10, help="timed steps per round (default 10)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    b.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    b.add_argument("--no-timm", action="store_true", help="skip timm's model of the same configuration")
    b.add_argument("--compile", action="store_true", help="torch.compile each transformer block (as train.compile: model and engine modes)")
    b.add_argument("--peak-tflops", type=float, default=None,
                   help="peak FLOP/s of one device in TFLOP/s for MFU (default: known GPUs only)")
    b.add_argument("--num-classes", type=int, default=None, help="classifier classes (default: from the data)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is steadier on a busy CPU)")
    b.add_argument("--json", default=None, help="also write the results to this JSON file")
    d = b.add_argument_group("--what data")
    d.add_argument("--images", type=int, default=512, help="JPEG files to generate (default 512)")
    d.add_argument("--min-size", type=int, default=256, help="smallest generated side in px (default 256)")
    d.add_argument("--max-size", type=int, default=500, help="largest generated side in px (default 500)")
    d.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size of --config, else 32")
    d.add_argument("--workers", type=int, default=None, help="default: data.num_workers of --config, else 2")
    d.add_argument("--img-size", type=int, default=None, help="default: model.img_size of --config, else 224")
    d.add_argument("--batches", type=int, default=10, help="timed batches per loader (default 10)")
    d.add_argument("--imagenet-sized", action="store_true",
                   help="ImageNet-sized JPEGs (500x375, ~110 KB) instead of 256-500 px crops (~30-60 KB)")
    d.add_argument("--tar-readers", action="store_true",
                   help="also time our loader with webdataset's tar reader in place of vitscale's tarstream")
    b.set_defaults(func=run_bench_cmd)


def _add_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="memory per GPU for each ZeRO stage and offload choice: does it fit?",
        description="Analytic memory per GPU (params, grads, optimizer states, DeepSpeed buffers, activations with "
                    "and without gradient checkpointing) for ZeRO 0-3 and offload, at the config's batch/img size/"
                    "precision. --measure checks the plan against a real training step on this machine.")
    p.add_argument("--config", "-c", required=True, help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1); data-parallel world = gpus x nodes")
    p.add_argument("--gpu-mem", type=float, default=None,
                   help="memory of one GPU in GB (2^30 bytes; default 80; --device cpu: this machine's memory / "
                        "--gpus)")
    p.add_argument("--reserve-gb", type=float, default=None,
                   help="kept free for the CUDA context, NCCL/cuBLAS workspaces, fragmentation (default 4; cpu 0)")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="cpu: plan the --gpus CPU processes of a rehearsal on this machine (vitscale preflight): "
                        "resident memory a process, the runtime included")
    p.add_argument("--num-classes", type=int, default=None, help="classifier classes (default: from the data)")
    p.add_argument("--measure", action="store_true",
                   help="also run the configured step here (1 process) and compare its peak with the plan")
    p.add_argument("--json", default=None, help="also write the plan (and measurement) to this JSON file")
    p.set_defaults(func=run_plan_cmd)


def _add_preflight(subparsers) -> None:
    f = subparsers.add_parser(
        "preflight", help="rehearse a recipe at its true size here: memory, checkpoint, resume, export, SIGTERM",
        description="Before a cluster launch: the recipe's model at its size and resolution on this machine (CPU "
                    "processes, or GPUs), 2 processes at the recipe's ZeRO stage for 2 steps and a checkpoint, a "
                    "resume on 1 process at another stage, an export timm loads, and a SIGTERM timed against the "
                    "grace. One table; exit 1 when any row fails (vitscale/bench/preflight.py).")
    f.add_argument("--config", "-c", required=True, help="the recipe, e.g. configs/mae_vit_l16.yaml")
    f.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    f.add_argument("--out", default="preflight_runs", help="directory for the rehearsal's run (default "
                                                           "./preflight_runs; replaced each time)")
    f.add_argument("--grace", type=float, default=None,
                   help="seconds between SIGTERM and SIGKILL (default: engine.preempt_grace_s, 30)")
    f.add_argument("--port", type=int, default=29650, help="first of 3 rendezvous ports (default 29650)")
    f.add_argument("--skip-preemption", action="store_true", help="leave out the kill -9 and SIGTERM launches (CI: minutes less)")
    f.set_defaults(func=run_preflight_cmd)


def _add_plot(subparsers) -> None:
    q = subparsers.add_parser("plot", help="PNG of loss, lr, throughput, MFU and data-wait over steps",
                              description="Plot RUN_DIR/metrics.jsonl into one PNG (default RUN_DIR/metrics.png).")
    q.add_argument("run_dir", help="run directory (runs/<name>) or its metrics.jsonl")
    q.add_argument("--out", "-o", default=None, help="output PNG (default RUN_DIR/metrics.png)")
    q.set_defaults(func=run_plot_cmd)


def _command() -> str:
    return "vitscale " + " ".join(sys.argv[1:])


def _stamp(payload: dict) -> dict:
    return {"date": datetime.date.today().isoformat(), "command": _command(), **payload}


def run_bench_cmd(args: argparse.Namespace) -> int:
    from vitscale.bench.common import write_json
    from vitscale.config.load import load_config

    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"bench: --threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if what == ("data",):
        from vitscale.bench.data import print_data_bench, run_data_bench
        from vitscale.config.resolve import resolve

        if args.overrides and not args.config:  # they would be dropped without a word
            raise ValueError(f"bench: overrides ({' '.join(args.overrides)}) need --config (without it --what data "
                             f"takes its flags: --batch-size, --workers, --img-size)")
        cfg = load_config(args.config, args.overrides) if args.config else None
        if cfg is not None:  # one process: its batch as training derives it (data.global_batch_size)
            cfg = resolve(cfg, 1, need_length=False).cfg

        def pick(flag, from_config, default):  # an explicit flag, else the config's value, else the default
            return flag if flag is not None else (from_config() if cfg is not None else default)
        res = run_data_bench(
            images=args.images, min_size=args.min_size, max_size=args.max_size,
            batch=pick(args.batch_size, lambda: cfg.data.batch_size, 32),
            workers=pick(args.workers, lambda: cfg.data.num_workers, 2),
            img_size=pick(args.img_size, lambda: cfg.model.img_size, 224),
            crop_min_scale=cfg.data.crop_min_scale if cfg is not None else 0.35, batches=args.batches,
            rounds=args.rounds, imagenet=args.imagenet_sized, tar_readers=args.tar_readers)
        print_data_bench(res)
    else:
        if "data" in what:
            raise ValueError("bench: --what data runs alone (it needs no config); run it separately")
        if args.config is None:
            raise ValueError("bench: --config is required for the model/engine/loader/step modes")
        from vitscale.bench.speed import print_bench, run_bench

        from vitscale.config.resolve import resolve
        from vitscale.distributed.env import detect_env

        cfg = load_config(args.config, args.overrides)  # validated before anything heavy is imported
        cfg = resolve(cfg, detect_env().world_size, need_length=False).cfg  # this launch's batch, as in training
        res = run_bench(cfg, what, iters=args.iters, warmup=args.warmup, rounds=args.rounds,
                        timm=not args.no_timm and _timm_available("model" in what),
                        compile_blocks=args.compile, peak_tflops=args.peak_tflops, num_classes=args.num_classes)
        print_bench(res)
    if args.json:
        print(f"wrote {write_json(args.json, _stamp(res))}")
    return 0


def _timm_available(wanted: bool) -> bool:
    """timm is only the reference bench compares against, so it is not a dependency of vitscale (``pip install
    -e .[test]`` brings it): without it the timm row is skipped with one line, and the rest of the bench runs."""
    import importlib.util

    if wanted and importlib.util.find_spec("timm") is None:
        print("bench: timm is not installed, so the timm reference is skipped (pip install timm, or --no-timm)")
        return False
    return wanted


def run_plan_cmd(args: argparse.Namespace) -> int:
    from vitscale.bench.common import resolve_num_classes, write_json
    from vitscale.bench.plan import plan_memory
    from vitscale.bench.plan_report import print_plan
    from vitscale.config.load import load_config

    cfg = load_config(args.config, args.overrides)
    cpu = args.device == "cpu"
    if args.gpus < 1 or args.nodes < 1:  # before anything divides by them
        raise ValueError(f"plan: --gpus and --nodes must be >= 1, got {args.gpus} and {args.nodes}")
    if args.gpu_mem is None:
        args.gpu_mem = host_memory_gb() / args.gpus if cpu else 80.0
    if args.reserve_gb is None:
        args.reserve_gb = 0.0 if cpu else 4.0
    plan = plan_memory(cfg, gpus=args.gpus, nodes=args.nodes, gpu_mem_gb=args.gpu_mem, reserve_gb=args.reserve_gb,
                       num_classes=args.num_classes, device=args.device)
    print_plan(plan, cfg.model.grad_checkpointing)
    payload = {"plan": plan.to_dict()}
    if args.measure:
        from vitscale.bench.engine_step import measure_step_memory
        import torch

        from vitscale.bench.plan import CPU_RUNTIME_BYTES
        from vitscale.distributed.ds_config import build_ds_config

        classes, _ = resolve_num_classes(cfg, args.num_classes)
        # The measured run is this machine's single process: plan the same (world 1, this machine's overlap).
        overlap = bool(build_ds_config(cfg, 1).get("zero_optimization", {}).get("overlap_comm", False))
        # On CPU the step's AdamW temporaries are live tensors too (planned with device="cpu"); the process
        # runtime that plan adds is not a tensor, so it is taken out again.
        on_cpu = not torch.cuda.is_available()
        here = plan_memory(cfg, gpus=1, nodes=1, gpu_mem_gb=args.gpu_mem, reserve_gb=args.reserve_gb,
                           num_classes=classes, overlap_comm=overlap, device="cpu" if on_cpu else "gpu")
        row = here.row(cfg.engine.zero_stage, cfg.engine.offload_optimizer, cfg.engine.offload_params)
        predicted = row.total_ckpt if cfg.model.grad_checkpointing else row.total
        predicted -= CPU_RUNTIME_BYTES if on_cpu else 0
        m = measure_step_memory(cfg, classes)
        ratio = predicted / m["peak_bytes"]
        mb = 2 ** 20
        print(f"measured on {m['device']} (1 process, {row.option}"
              f"{', grad ckpt' if cfg.model.grad_checkpointing else ''}, overlap_comm={overlap}): peak "
              f"{m['peak_bytes'] / mb:.1f} MB ({m['method']}), at rest {m['at_rest_bytes'] / mb:.1f} MB "
              f"({m['at_rest_bytes'] / m['params']:.2f} bytes/param); plan for this run {predicted / mb:.1f} MB "
              f"-> plan/measured = {ratio:.3f}")
        payload["measured"] = {**m, "predicted_bytes": int(predicted), "plan_over_measured": ratio,
                               "plan_world1": here.to_dict()}
    if args.json:
        print(f"wrote {write_json(args.json, _stamp(payload))}")
    return 0


def run_preflight_cmd(args: argparse.Namespace) -> int:
    from vitscale.bench.preflight import preflight
    from vitscale.config.load import load_config

    grace = args.grace if args.grace is not None else load_config(args.config, args.overrides).engine.preempt_grace_s
    return preflight(args.config, args.overrides, args.out, grace=grace, port=args.port,
                     preemption=not args.skip_preemption)


def host_memory_gb() -> float:
    """This machine's memory in GB (2^30 bytes)."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30


def run_plot_cmd(args: argparse.Namespace) -> int:
    from vitscale.logging.plot import plot_run

    res = plot_run(args.run_dir, args.out)
    missing = f" ({', '.join(res['unavailable'])}: n/a)" if res["unavailable"] else ""
    print(f"wrote {res['path']}: {', '.join(res['titles'])} over {res['steps']} log steps{missing}")
    return 0
