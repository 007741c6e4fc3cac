"""Where one training step's time goes: the engine step of `vitscale bench` (the Trainer's own step), split into
its phases and profiled. For a missed speed target: which op or wait dominates.

    python3 benchmarks/profile_step.py --config configs/sup_vit_l16.yaml data.batch_size=128 [--steps 3]

Prints (1) each phase's time with a device sync around it (to device + normalise, forward + loss, backward,
optimizer step), against the whole step without those syncs; (2) the top kernels by device time and the top
operators by host time from torch.profiler over --steps steps. Runs on CPU too (tiny configs in tests).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's vitscale

from vitscale.bench.common import resolve_num_classes  # noqa: E402
from vitscale.bench.engine_step import EngineStep, synthetic_batch  # noqa: E402
from vitscale.config.load import load_config  # noqa: E402
from vitscale.config.resolve import resolve  # noqa: E402
from vitscale.distributed.env import detect_env  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def phase_times(runner: EngineStep, images: torch.Tensor, labels: torch.Tensor, steps: int) -> dict[str, float]:
    """Milliseconds per phase, each bracketed by a device sync (median over ``steps``)."""
    trainer, engine = runner.trainer, runner.engine
    out: dict[str, list[float]] = {"to_device": [], "forward": [], "backward": [], "optimizer_step": []}
    for _ in range(steps):
        marks = [time.perf_counter()]
        x, y = trainer._to_device({"image": images, "label": labels})
        _sync(), marks.append(time.perf_counter())
        loss, _ = trainer.objective(engine, x, y)
        _sync(), marks.append(time.perf_counter())
        engine.backward(loss)
        _sync(), marks.append(time.perf_counter())
        engine.step()
        _sync(), marks.append(time.perf_counter())
        for k, a, b in zip(out, marks, marks[1:]):
            out[k].append(1e3 * (b - a))
    return {k: sorted(v)[len(v) // 2] for k, v in out.items()}


def whole_step_ms(runner: EngineStep, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step(images, labels)
    _sync()
    return 1e3 * (time.perf_counter() - t0) / steps


def profile_tables(runner: EngineStep, images, labels, steps: int, rows: int) -> tuple[str, str]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            runner.step(images, labels)
        _sync()
    ka = prof.key_averages()
    dev_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return ka.table(sort_by=dev_key, row_limit=rows), ka.table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = resolve(load_config(args.config, args.overrides), detect_env().world_size).cfg
    classes = resolve_num_classes(cfg)[0]
    runner = EngineStep(cfg, classes)
    images, labels = synthetic_batch(runner.cfg, classes)
    for _ in range(args.warmup):
        runner.step(images, labels)
    whole = whole_step_ms(runner, images, labels, args.steps)
    phases = phase_times(runner, images, labels, args.steps)
    B = runner.cfg.data.batch_size
    print(f"whole step {whole:.1f} ms ({B / whole * 1e3:.0f} img/s); phases with a sync around each: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in phases.items()) + f" (sum {sum(phases.values()):.1f})")
    by_device, by_host = profile_tables(runner, images, labels, args.steps, args.rows)
    print("top operators by device time:\n" + by_device)
    print("top operators by host time:\n" + by_host)
    if args.json:
        Path(args.json).write_text(json.dumps({"whole_step_ms": whole, "phases_ms": phases, "batch": B,
                                               "zero_stage": runner.cfg.engine.zero_stage}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
