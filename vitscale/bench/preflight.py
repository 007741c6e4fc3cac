"""``vitscale preflight``: rehearse a recipe at its true model size and resolution on the machine at hand.

Every test trains a micro ViT; a recipe's real size is where memory, checkpoints and preemption break. Preflight
runs the recipe as a cluster launch would, only shorter, and prints one table:

1. 2 processes (``deepspeed --num_gpus 2``; CPU processes with DeepSpeed's CPU accelerator where there is no GPU)
   under the recipe's ZeRO stage train 2 steps and write a checkpoint: parameters, planned
   (``vitscale plan --device cpu|gpu``) vs measured peak memory a process, step time, checkpoint size, write time;
2. 1 process at another ZeRO stage resumes it (universal conversion) and takes a step: conversion and load time;
3. ``vitscale export --timm`` of 1.'s checkpoint and ``timm.create_model("local-dir:...")``: export time and size,
   timm loads it;
4. 2 processes resume the checkpoint of 1. (the one 2. wrote is removed once its row is done) for one more step
   and are SIGKILLed while its checkpoint is being written (a quarter of the bytes on disk): the previous
   checkpoint must stay the resume point (as after an OOM kill or a lost node);
5. 2 processes resume it again and get SIGTERM in their first step: time from the signal to a complete checkpoint,
   against ``--grace`` (the launcher's and Slurm's default: 30 s before SIGKILL).

The batch is cut to 2 a process on CPU (to what fits when less; a recipe that does not fit at batch 1 is refused
in one line before anything is launched), precision to fp32 on CPU (no bf16 units), the
data to the bundled photos unless the recipe's shards exist. Exit status 1 when any row fails; the row says why.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from vitscale.bench.common import bytes_under
from vitscale.bench.launch_watch import available_bytes, run
from vitscale.config.load import load_config
from vitscale.config.resolve import resolve
from vitscale.config.schema import Config
from vitscale.errors import VitscaleError
from vitscale.distributed.checkpoint import (CheckpointManager, checkpoint_bytes, is_complete, read_trainer_state,
                                             tag_for, write_seconds)

GB = 2 ** 30
MEMORY_TOLERANCE = 0.15  # a measured peak above the plan by more than this fails: the plan would mislead


@dataclass
class Row:
    what: str
    value: str
    ok: bool = True
    note: str = ""


def rehearsal_overrides(cfg: Config, cuda: bool, procs: int = 2) -> list[str]:
    """What preflight changes in the recipe: short, local, quiet; model, resolution and ZeRO stage untouched. A
    ``data.global_batch_size`` that ``procs`` processes cannot share whole is the ConfigError training gives."""
    from vitscale.data.mix import resolve_train_set

    out = ["train.epochs=null", "train.steps=2", "train.ckpt_every=2", "train.keep_last=0", "train.log_every=1",
           "train.progress=false", "train.eval_every=0", "logging.wandb.mode=disabled", "logging.image_every=0",
           "data.num_workers=0", "data.val_shards="]
    if cfg.optim.warmup_epochs is not None:  # epochs of data the rehearsal does not read: warm up over 1 step
        out += ["optim.warmup_epochs=null", "optim.warmup_steps=1"]
    try:
        resolve_train_set(cfg.data.train_shards, cfg.data.cache_dir)
    except (FileNotFoundError, ValueError, OSError):
        out.append("data.train_shards=demo:photos")
    if cfg.model.init and not Path(cfg.model.init).exists():  # a fine-tuning recipe's placeholder path
        print(f"preflight: model.init {cfg.model.init} does not exist here: the rehearsal starts from random weights",
              flush=True)
        out.append("model.init=")
    batch = cfg.data.batch_size
    if cfg.data.global_batch_size:  # the batch a process gets on ``procs`` processes; fit_batch cuts it to what fits
        batch = resolve(cfg, procs, need_length=False).cfg.data.batch_size  # training's own derivation and check
        out += ["data.global_batch_size=null", f"data.batch_size={batch}"]
    if not cuda:
        out += ["train.precision=fp32", f"data.batch_size={min(batch or 2, 2)}"]
    return out


class DoesNotFit(VitscaleError, RuntimeError):
    """The rehearsal's plan does not fit this machine even at batch 1: preflight refuses before launching (the
    launch would only feed the OOM killer, which may take a neighbour's process instead)."""

    def __init__(self, message: str, planned: float, budget: float):
        super().__init__(message)
        self.planned, self.budget = planned, budget  # bytes a process: planned at batch 1, and what there is


def fit_batch(cfg_args: tuple[str, list[str]], procs: int, device: str) -> tuple[Config, int]:
    """Halve the batch until the plan fits this machine's available memory (CPU) or the GPU; (config, planned).
    Raises :class:`DoesNotFit` when a process does not fit at batch 1."""
    from vitscale.bench.common import resolve_num_classes
    from vitscale.bench.plan import plan_memory

    path, overrides = cfg_args
    cfg = load_config(path, overrides)
    budget = available_bytes() / procs if device == "cpu" else torch.cuda.get_device_properties(0).total_memory
    while True:
        classes, _ = resolve_num_classes(cfg)
        plan = plan_memory(cfg, gpus=procs, num_classes=classes, device=device, gpu_mem_gb=budget / GB, reserve_gb=0)
        row = plan.row(cfg.engine.zero_stage, cfg.engine.offload_optimizer, cfg.engine.offload_params)
        planned = row.total_ckpt if cfg.model.grad_checkpointing else row.total
        if planned <= budget:
            return cfg, int(planned)
        if cfg.data.batch_size <= 1:
            where = f"{budget / GB:.1f} GB available a process" if device == "cpu" else f"a {budget / GB:.1f} GB GPU"
            raise DoesNotFit(f"preflight: {cfg.model.name} does not fit here: {procs} processes at ZeRO-"
                             f"{cfg.engine.zero_stage} plan {planned / GB:.1f} GB each at batch 1, {where} (vitscale "
                             f"plan --device {device} --gpus {procs}); nothing launched", planned, budget)
        overrides = [*overrides, f"data.batch_size={max(1, cfg.data.batch_size // 2)}"]
        cfg = load_config(path, overrides)


def train_cmd(procs: int, port: int, config: str, overrides: list[str]) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "vitscale", "train", "--config", config, *overrides]
    launcher = shutil.which("deepspeed") or "deepspeed"
    return [launcher, "--num_gpus", str(procs), "--master_port", str(port), "--module", "vitscale", "train",
            "--config", config, *overrides]


def other_stage(stage: int) -> int:
    """The stage the 1-process resume uses: ZeRO-3 -> 2, anything else -> 3 (across the ZeRO-3 divide)."""
    return 2 if stage == 3 else 3


def checkpoint_rows(ckpt: Path) -> list[Row]:
    size = checkpoint_bytes(ckpt)
    seconds = write_seconds(ckpt) or 0.0
    return [Row("checkpoint size", f"{size / GB:.2f} GB"),
            Row("checkpoint write", f"{seconds:.1f} s ({size / 2**20 / max(seconds, 1e-9):.0f} MB/s)")]


def _seconds(pattern: str, text: str) -> Optional[float]:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def preflight(config: str, overrides: list[str], out_dir: Path, grace: float = 30.0, port: int = 29650,
              preemption: bool = True) -> int:
    """Run the rehearsal; print the table; 0 when every row passed, else 1."""
    from vitscale.bench.common import print_table

    cuda = torch.cuda.is_available()
    device = "gpu" if cuda else "cpu"
    procs = min(2, torch.cuda.device_count()) if cuda else 2
    recipe = load_config(config, overrides)
    rehearsal = rehearsal_overrides(recipe, cuda, procs)
    cfg, planned = fit_batch((config, [*overrides, *rehearsal]), procs, device)
    out_dir = Path(out_dir).resolve()
    shutil.rmtree(out_dir / "preflight", ignore_errors=True)
    shutil.rmtree(out_dir / "logs", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [*overrides, *rehearsal, f"data.batch_size={cfg.data.batch_size}",
            f"run.dir={out_dir}", "run.name=preflight"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    stage = cfg.engine.zero_stage
    print(f"vitscale preflight: {cfg.model.name} at {cfg.model.img_size}px, {cfg.objective.name}, ZeRO-{stage}, "
          f"{procs} {'GPU' if cuda else 'CPU'} processes, batch {cfg.data.batch_size} a process, "
          f"{cfg.train.precision}, data {cfg.data.train_shards}", flush=True)
    rows = rehearse(cfg, config, args, env, out_dir, procs, device, planned, grace, port, preemption)
    print_table(["check", "measured", "ok", "why / note"],
                [[r.what, r.value, "yes" if r.ok else "FAIL", r.note] for r in rows])
    failed = [r for r in rows if not r.ok]
    kept = bytes_under(out_dir / "preflight")
    print(f"preflight {'FAILED: ' + ', '.join(r.what for r in failed) if failed else 'passed'} "
          f"(run directory {out_dir / 'preflight'}, {kept / GB:.1f} GB of checkpoints and logs to delete when "
          f"done; each launch's output in {out_dir / 'logs'})")
    return 1 if failed else 0


def rehearse(cfg: Config, config: str, args: list[str], env: dict, out_dir: Path, procs: int, device: str,
             planned: int, grace: float, port: int, preemption: bool = True) -> list[Row]:
    """The four launches on ``device`` ("gpu" or "cpu"), each adding its rows; a failed launch ends the rehearsal
    with the row saying why."""
    stage = cfg.engine.zero_stage
    run_dir = out_dir / "preflight"
    ckpts = run_dir / "checkpoints"
    params = sum(p.numel() for p in _meta_model(cfg).parameters())
    rows = [Row("parameters", f"{params / 1e6:.1f}M")]

    first = run(train_cmd(procs, port, config, args), env, out_dir)
    measured = max(first.peaks.values(), default=0)
    ratio = measured / planned if planned else 0.0
    rows.append(Row("peak memory a process", f"{measured / GB:.2f} GB (plan {planned / GB:.2f} GB, x{ratio:.2f})",
                    first.returncode != 0 or ratio <= 1 + MEMORY_TOLERANCE,
                    "" if ratio <= 1 + MEMORY_TOLERANCE else f"more than {MEMORY_TOLERANCE:.0%} over the plan"))
    if first.returncode != 0:
        rows.append(Row(f"train {procs} procs ZeRO-{stage}", f"exit {first.returncode}", False, first.error()))
        return rows
    state = read_trainer_state(ckpts / "step_00000002")
    rows.append(Row("step time", f"{state['step_s']:.1f} s (first launch {first.seconds:.0f} s)"))
    rows += checkpoint_rows(ckpts / "step_00000002")

    rows += resume_rows(cfg, config, args, env, out_dir, port + 1, device)
    drop_conversions(ckpts)
    # The resume row's checkpoint (the other stage, 1 process) has served its row. The rows below resume the
    # recipe's own, as a relaunch of the real run would; left the newest, it was converted to the universal layout
    # once more by the next launch (minutes at ViT-H, and up to 3x its size on disk).
    CheckpointManager(ckpts, rank=0).rewind(int(state["step"]))
    rows += export_rows(run_dir, out_dir, env)
    if preemption:
        rows.append(torn_write_row(procs, port + 2, config, args, env, out_dir, ckpts))
        rows.append(preemption_row(procs, port + 3, config, args, env, out_dir, ckpts, grace))
        drop_conversions(ckpts)
    return rows


def drop_conversions(ckpts: Path) -> None:
    """Remove the universal copies a stage-changing resume made once their row is done: at ViT-H size each is as
    large as its checkpoint (8-10 GB), and the rehearsal's later launches and a look at its run directory need only
    the checkpoints themselves."""
    for conversion in ckpts.glob("*/universal"):
        shutil.rmtree(conversion, ignore_errors=True)


def resume_rows(cfg: Config, config: str, args: list[str], env: dict, out_dir: Path, port: int,
                device: str) -> list[Row]:
    """Resume the 2-process checkpoint on 1 process at the other ZeRO stage (universal conversion). When that one
    process's plan does not fit the memory at hand (ViT-H/14 at ZeRO-2 plans 20.6 GB), the row fails in one line
    instead of launching into the OOM killer, and the rehearsal goes on with the export and the preemption rows."""
    other = other_stage(cfg.engine.zero_stage)
    try:
        one, _ = fit_batch((config, [*args, f"engine.zero_stage={other}"]), 1, device)  # the batch cut to fit
    except DoesNotFit as e:
        return [Row(f"resume 1 proc ZeRO-{other}", "not run", False,
                    f"1 process at ZeRO-{other} plans {e.planned / GB:.1f} GB, {e.budget / GB:.1f} GB available here")]
    second = run(train_cmd(1, port, config, [*args, f"data.batch_size={one.data.batch_size}", "train.steps=3",
                                             f"engine.zero_stage={other}"]), env, out_dir)
    if second.returncode != 0:
        return [Row(f"resume 1 proc ZeRO-{other}", f"exit {second.returncode}", False, second.error())]
    return [Row("universal conversion", f"{_seconds(r'converted in ([0-9.]+) s', second.out) or 0:.1f} s"),
            Row(f"resume 1 proc ZeRO-{other}", f"loaded in {_seconds(r'loaded in ([0-9.]+) s', second.out):.1f} s"
                f", 1 step")]


def _meta_model(cfg: Config):
    from vitscale.bench.common import resolve_num_classes
    from vitscale.objectives import build_model

    with torch.device("meta"):
        return build_model(cfg, resolve_num_classes(cfg)[0])


def export_rows(run_dir: Path, out_dir: Path, env: dict) -> list[Row]:
    target = out_dir / "preflight_timm"
    shutil.rmtree(target, ignore_errors=True)
    ex = run([sys.executable, "-m", "vitscale", "export", str(run_dir), str(target), "--timm"], env, out_dir)
    if ex.returncode != 0:
        return [Row("export --timm", f"exit {ex.returncode}", False, ex.error())]
    size = sum(p.stat().st_size for p in target.iterdir())
    rows = [Row("export --timm", f"{ex.seconds:.1f} s, {size / GB:.2f} GB")]
    code = (f"import timm, torch; m = timm.create_model('local-dir:{target}'); "
            "print('params', sum(p.numel() for p in m.parameters()))")
    load = run([sys.executable, "-c", code], env, out_dir)
    rows.append(Row("timm.create_model(local-dir)", f"{load.seconds:.1f} s" if load.returncode == 0 else
                    f"exit {load.returncode}", load.returncode == 0, "" if load.returncode == 0 else load.error()))
    if load.returncode == 0:  # a rehearsal's weights are worth nothing once timm has read them (2.5 GB at ViT-H)
        shutil.rmtree(target, ignore_errors=True)
    return rows


def preemption_row(procs: int, port: int, config: str, args: list[str], env: dict, out_dir: Path, ckpts: Path,
                   grace: float) -> Row:
    """Resume on PROCS processes; once their first step is logged, SIGTERM every process of the launch (as Slurm
    does) and time the complete checkpoint: the signal lands at a step's start, so the measure is a whole step
    plus the write. The deepspeed launcher SIGKILLs its children 30 s after it gets SIGTERM, like Slurm's KillWait."""
    before = set(p.name for p in ckpts.iterdir() if (p / "COMPLETE").is_file())  # not a torn one
    metrics = ckpts.parent / "metrics.jsonl"
    logged = len(metrics.read_text().splitlines())
    sent: dict[str, float] = {}

    def signal_in_first_step(text: str, proc: subprocess.Popen) -> None:
        if not sent and len(metrics.read_text().splitlines()) > logged:
            os.killpg(proc.pid, signal.SIGTERM)
            sent["at"] = time.time()

    launch = run(train_cmd(procs, port, config, [*args, "train.steps=1000"]), env, out_dir, signal_in_first_step)
    new = sorted(p for p in ckpts.iterdir() if p.name not in before and (p / "COMPLETE").is_file())
    if not sent:
        return Row("SIGTERM -> checkpoint", "not sent", False, f"the run ended first: {launch.error()}")
    if not new:
        return Row("SIGTERM -> checkpoint", "none", False,
                   f"no complete checkpoint: the ranks were killed {grace:g} s after the signal (the launcher's "
                   "grace) before step + write ended; see docs/multinode.md")
    done = new[-1] / "COMPLETE"
    said = _seconds(r"checkpointed at step \d+, exiting \(([0-9.]+) s after the signal", launch.out)
    # without the rank's own line (it was killed before it could exit), the marker's time says when it completed
    seconds = said if said is not None else done.stat().st_mtime - sent["at"]
    note = f"grace {grace:g} s" + ("" if seconds <= grace else ": too slow, see docs/multinode.md")
    if said is None:
        note += "; rank 0 did not exit after its checkpoint and was killed (launch log)"
    return Row("SIGTERM -> checkpoint", f"{seconds:.1f} s ({new[-1].name})", seconds <= grace, note)


TORN_FRACTION = 0.25  # of the previous checkpoint's bytes on disk when the kill lands: well inside the write


def torn_write_row(procs: int, port: int, config: str, args: list[str], env: dict, out_dir: Path,
                   ckpts: Path) -> Row:
    """Resume on PROCS processes for one step with a checkpoint, and SIGKILL every process of the launch once that
    checkpoint's directory holds TORN_FRACTION of the previous one's bytes: the write is cut as an OOM kill or a lost
    node would cut it. The previous complete checkpoint must stay the resume point."""
    previous = CheckpointManager(ckpts, rank=0).find("auto")
    prev_bytes = checkpoint_bytes(previous)
    target = ckpts / tag_for(int(read_trainer_state(previous)["step"]) + 1)
    killed: dict[str, int] = {}

    def kill_mid_write(text: str, proc: subprocess.Popen) -> None:
        if not killed and target.is_dir() and (written := bytes_under(target)) >= TORN_FRACTION * prev_bytes:
            os.killpg(proc.pid, signal.SIGKILL)
            killed["bytes"] = written

    step = int(target.name.split("_")[1])
    launch = run(train_cmd(procs, port, config, [*args, f"train.steps={step}", "train.ckpt_every=1"]), env, out_dir,
                 kill_mid_write)
    if not killed:
        return Row("kill -9 during checkpoint write", "not sent", False,
                   f"the write was not caught in progress (exit {launch.returncode}): {launch.error()}")
    return torn_verdict(ckpts, previous, target, killed["bytes"], prev_bytes)


def torn_verdict(ckpts: Path, previous: Path, torn: Path, written: int, prev_bytes: int) -> Row:
    """The row of a write cut at WRITTEN bytes: TORN must not count as complete, and a resume must pick PREVIOUS."""
    complete, why = is_complete(torn)
    with warnings.catch_warnings():  # "skipping checkpoint ..." is this row's finding, said in the table
        warnings.simplefilter("ignore")
        resume = CheckpointManager(ckpts, rank=0).find("auto")
    value = f"cut at {written / GB:.2f} of ~{prev_bytes / GB:.2f} GB; resume point {resume.name if resume else None}"
    if complete:
        return Row("kill -9 during checkpoint write", value, False, f"{torn.name} counts as complete")
    if resume != previous:
        return Row("kill -9 during checkpoint write", value, False, f"a resume would not continue {previous.name}")
    return Row("kill -9 during checkpoint write", value, True, f"{torn.name}: {why}")
