"""``vitscale bench``: training throughput of the model alone, the engine, the loader and the full step.

Modes (``--what``, comma-separated; default all four):
  model   our model in plain PyTorch (no DeepSpeed), eager (or blocks compiled with ``--compile``), through the
          trainer's own step (``Trainer.step`` over :class:`vitscale.train.plain.PlainEngine`: AdamW, autocast in
          the config's precision) on a synthetic uint8 batch — and timm's model of the same configuration
          through the same step on the same batch in the same run (``--no-timm`` to skip); their ratio is printed.
  engine  the real training step through ``vitscale.distributed.engine`` (DeepSpeed ZeRO as configured) on a
          synthetic uint8 batch: normalise, cast, objective, ``engine.backward``, ``engine.step``; with
          ``--compile`` its blocks are compiled as ``train.compile`` compiles them in training.
  loader  the WebDataset loader alone (``data.train_shards``), batches as the trainer receives them.
  step    loader + engine together, like the training loop; reports the data-wait fraction.
Each mode runs ``--warmup`` untimed steps, then ``--rounds`` timed rounds of ``--iters`` steps; the median
round is reported. On CPU the rounds of model, timm, engine and step alternate (in reversed order every other
round) so a busy machine slows all alike; the full step first drains what the loader prefetched meanwhile.
Memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak live tensor bytes of one extra step
(:mod:`vitscale.bench.memory`; the model and optimizer states are tracked from their creation).
MFU = 3 x analytic forward FLOPs x img/s / peak FLOP/s (``--peak-tflops`` or the known GPU table).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from typing import Any, Callable, Optional

import torch
import psutil

from vitscale.bench.common import (bench_device, device_label, fmt_gb, fmt_num, print_table,
    resolve_num_classes, sync)
from vitscale.bench.engine_step import EngineStep, synthetic_batch
from vitscale.bench.memory import LiveTensorMemory
from vitscale.bench.timm_ref import no_timm_reference, timm_reference
from vitscale.config.resolve import global_batch
from vitscale.config.schema import Config
from vitscale.data.mix import resolve_train_set, train_stream_from_config
from vitscale.distributed import compile as regional
from vitscale.distributed.env import detect_env
from vitscale.logging.metrics import device_peak_flops
from vitscale.models.freeze import freeze
from vitscale.objectives import build_model, objective_for

MODES = ("model", "engine", "loader", "step")


class Timed:
    """One thing to time: ``setup()`` builds it and returns ``fn`` (one training step). On CPU its memory is
    tracked from construction (``track``), so parameters and optimizer states count. ``pre_round`` runs untimed
    before every round (the full step drains what the loader prefetched while other modes were timed)."""

    def __init__(self, name: str, device: torch.device, setup: Callable[[], Callable[[], Any]],
                 images_per_step: int, track: bool = True, pre_round: Optional[Callable[[], None]] = None,
                 devices: int = 1):
        self.name, self.device, self.setup, self.images_per_step = name, device, setup, images_per_step
        self.devices = devices  # accelerators sharing images_per_step (the engine under a multi-GPU launch)
        self.tracker = LiveTensorMemory(device.type) if device.type == "cpu" and track else None
        self.track, self.pre_round = track, pre_round
        self.fn: Optional[Callable[[], Any]] = None
        self.rounds: list[float] = []
        self.peak_bytes: Optional[int] = None

    def tracking(self):
        return self.tracker if self.tracker is not None else contextlib.nullcontext()

    def prepare(self, warmup: int) -> None:
        """Build, then warm up; the first step (which creates the optimizer states) is tracked too."""
        with self.tracking():
            self.fn = self.setup()
            self.fn()
        for _ in range(max(warmup - 1, 0)):
            self.fn()

    def free(self) -> None:
        self.fn = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def round(self, iters: int) -> None:
        if self.pre_round is not None:
            self.pre_round()
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            self.fn()
        sync(self.device)
        self.rounds.append(time.perf_counter() - t0)

    def measure_memory(self) -> None:
        if not self.track:
            return
        if self.tracker is not None:
            with self.tracker:
                self.tracker.reset_peak()
                self.fn()
            self.peak_bytes = self.tracker.peak
        else:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.fn()
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)

    def result(self, iters: int, flops_per_image: Optional[float], peak_flops: Optional[float]) -> dict:
        seconds = statistics.median(self.rounds)
        img_s = self.images_per_step * iters / seconds
        mfu = flops_per_image * img_s / (peak_flops * self.devices) if (flops_per_image and peak_flops) else None
        return {"img_per_s": img_s, "step_ms": 1000 * seconds / iters, "mfu": mfu, "peak_mem_bytes": self.peak_bytes,
                "rounds_s": self.rounds}


def _model_step(cfg: Config, model: torch.nn.Module, device: torch.device, num_classes: int) -> Callable[[], Any]:
    """The trainer's own step (``Trainer.step``) on ``model`` in plain PyTorch (:class:`PlainEngine`), on one
    fixed synthetic batch: ours and timm's get the same batch and the same step."""
    freeze(model, cfg.model.freeze)  # as training: a linear probe's step trains (and backpropagates into) the head
    runner = EngineStep(cfg, num_classes, model=model, device=device)
    images, labels = synthetic_batch(runner.cfg, num_classes)
    return lambda: runner.step(images, labels)


def _loader(cfg: Config, env) -> Any:
    train_set = resolve_train_set(cfg.data.train_shards, cfg.data.cache_dir)  # one spec, or a mix of sources
    return train_stream_from_config(cfg, train_set, env.rank, env.world_size)


def _workers_rss() -> int:
    return sum(c.memory_info().rss for c in psutil.Process().children(recursive=True))


def _check_args(cfg: Config, what: tuple[str, ...], iters: int, warmup: int, rounds: int) -> torch.device:
    bad = [w for w in what if w not in MODES]
    if bad or not what:
        raise ValueError(f"bench: unknown mode(s) {', '.join(bad) or '(none)'}; choose from {', '.join(MODES)}"
                         " or 'data'")
    if min(iters, rounds) < 1 or warmup < 0:
        raise ValueError(f"bench: --iters and --rounds must be >= 1 and --warmup >= 0 (got {iters}, {rounds}, "
                         f"{warmup})")
    device = bench_device()
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ValueError("bench: train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return device


class _Bench:
    """What the modes of one ``run_bench`` share: the config, the device, the engine the engine/step/loader
    modes reuse, and the loader's iterator. Each ``setup_*`` builds one mode's step function for :class:`Timed`."""

    def __init__(self, cfg: Config, device: torch.device, classes: int, compile_blocks: bool):
        self.cfg, self.device, self.classes, self.compile = cfg, device, classes, compile_blocks
        with torch.device("meta"):  # configuration, FLOPs and parameter count without memory
            self.shape_net = build_model(cfg, classes)
        freeze(self.shape_net, cfg.model.freeze)  # FLOPs (MFU) of what trains: objectives' flops_per_image
        self.world = detect_env().world_size
        self.engine: Any = None  # vitscale.bench.engine_step.EngineStep, built by setup_engine
        self.batches: Any = None  # the loader's iterator (step and loader modes)
        self.waits: list[float] = []  # time the full step waited for each batch
        self.prefetch = 2 * max(cfg.data.num_workers, 1)  # DataLoader's default prefetch_factor x workers
        self.step_fn: Optional[Callable[[], Any]] = None
        self.timm_params: Optional[int] = None

    def setup_ours(self) -> Callable[[], Any]:
        torch.manual_seed(self.cfg.run.seed)
        net = build_model(self.cfg, self.classes)
        if self.compile:
            regional.compile_blocks(net, self.device)  # as train.compile does inside the engine
        return _model_step(self.cfg, net, self.device, self.classes)

    def setup_timm(self) -> Callable[[], Any]:
        torch.manual_seed(self.cfg.run.seed)
        net = timm_reference(self.shape_net, objective_for(self.cfg), self.cfg.model.drop_path)
        self.timm_params = sum(p.numel() for p in net.parameters())
        if self.cfg.model.grad_checkpointing and hasattr(net, "set_grad_checkpointing"):
            net.set_grad_checkpointing(True)  # timm has no "first N blocks": with N, timm recomputes all
        if self.compile:
            regional.compile_blocks(net, self.device)
        return _model_step(self.cfg, net, self.device, self.classes)  # the same batch as ours

    def setup_engine(self) -> Callable[[], Any]:
        self.engine = EngineStep(self.cfg, self.classes)  # train.compile set by run_bench when --compile
        images, labels = synthetic_batch(self.cfg, self.classes)
        return lambda: self.engine.step(images, labels)

    def setup_step(self) -> Callable[[], Any]:
        self.batches = iter(_loader(self.cfg, self.engine.env))
        return self.loader_step

    def loader_step(self) -> None:
        t0 = time.perf_counter()
        batch = next(self.batches)
        self.waits.append(time.perf_counter() - t0)
        self.engine.step(batch["image"], batch["label"])

    def drain(self) -> None:
        """Batches prefetched while other modes ran would hide the loader's real cost: drop them, then run a few
        steps so the workers are busy while the engine computes, as in steady-state training."""
        for _ in range(self.prefetch):
            next(self.batches)
        for _ in range(max(self.cfg.data.num_workers, 1)):
            self.loader_step()
        self.waits.clear()

    def timed(self, what: tuple[str, ...], timm: bool) -> list[Timed]:
        """The Timed modes in order: model, timm, engine (also when only the full step needs it), step."""
        B, per_step = self.cfg.data.batch_size, global_batch(self.cfg, self.world)
        out = []
        if "model" in what:
            out.append(Timed("model", self.device, self.setup_ours, B))
            if timm:
                out.append(Timed("timm", self.device, self.setup_timm, B))
        if "engine" in what or "step" in what:
            out.append(Timed("engine", self.device, self.setup_engine, per_step, devices=self.world))
        if "step" in what:
            out.append(Timed("step", self.device, self.setup_step, per_step, track=False, pre_round=self.drain,
                             devices=self.world))
        return out

    def loader_only(self, iters: int, warmup: int, rounds: int, flops: float, peak: Optional[float]) -> dict:
        """The loader alone (the full step's iterator, if there was one): batches as the trainer receives them."""
        if self.batches is None:
            self.batches = iter(_loader(self.cfg, self.engine.env if self.engine is not None else detect_env()))
            for _ in range(warmup):
                next(self.batches)
        secs = []
        for _ in range(rounds):
            for _ in range(self.prefetch):  # what the workers prefetched meanwhile is not the loader's speed
                next(self.batches)
            t0 = time.perf_counter()
            for _ in range(iters):
                next(self.batches)
            secs.append(time.perf_counter() - t0)
        img_s = self.cfg.data.batch_size * iters / statistics.median(secs)
        return {"img_per_s": img_s, "step_ms": 1000 * statistics.median(secs) / iters,
                "mfu": flops * img_s / peak if (flops and peak) else None,
                "peak_mem_bytes": None, "worker_rss_bytes": _workers_rss(), "rounds_s": secs}


def _run_rounds(timed: list[Timed], timed_rounds: list[Timed], bench: _Bench, warmup: int, rounds: int,
                iters: int) -> list[float]:
    """Prepare, time and measure every mode; returns the full step's data wait per round. On CPU the rounds of
    all modes alternate (reversed every other round) so a busy machine slows all alike; on a GPU one mode after
    another, each freed before the next, so the peak-memory counter sees one model at a time."""
    step_waits: list[float] = []

    def one_round(t: Timed) -> None:
        t.round(iters)
        if t.name == "step":
            step_waits.append(sum(bench.waits))
    if bench.device.type == "cpu":
        for t in timed:
            t.prepare(warmup)
        for r in range(rounds):
            for t in (timed_rounds if r % 2 == 0 else timed_rounds[::-1]):  # no mode is always first
                one_round(t)
        for t in timed:
            t.measure_memory()
        return step_waits
    for t in timed:
        t.prepare(warmup)
        t.measure_memory()
        if t in timed_rounds:
            for _ in range(rounds):
                one_round(t)
        if t.name not in ("engine", "step"):
            t.free()
    return step_waits


def _paired_ratio(ours: dict, timm: dict) -> float:
    """Speed of ``ours`` over timm's: the median over rounds of timm's round time / ours. The two rounds of one index
    run back to back (the modes alternate), so each pair sees the same load from whatever else shares the machine;
    the ratio of the two medians would mix rounds taken under different loads. Per-image, as img/s is."""
    def images(mode: dict) -> float:  # a round's images: img_per_s was computed from the median round
        return mode["img_per_s"] * statistics.median(mode["rounds_s"])

    pairs = [(t / images(timm)) / (o / images(ours)) for o, t in zip(ours["rounds_s"], timm["rounds_s"])]
    return statistics.median(pairs)


def run_bench(cfg: Config, what: tuple[str, ...] = MODES, iters: int = 10, warmup: int = 3, rounds: int = 3,
              timm: bool = True, compile_blocks: bool = False, peak_tflops: Optional[float] = None,
              num_classes: Optional[int] = None) -> dict[str, Any]:
    """Run the requested modes; returns the JSON-able results (also printed as a table by :func:`print_bench`).

    ``compile_blocks`` (``--compile``) or ``train.compile``: every mode compiles its transformer blocks the way
    training does (:func:`vitscale.distributed.compile.compile_blocks`; the engine through ``train.compile``)."""
    device = _check_args(cfg, what, iters, warmup, rounds)
    compiled = compile_blocks or cfg.train.compile
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=compiled))
    classes, _ = resolve_num_classes(cfg, num_classes, read_shards="loader" in what or "step" in what)
    bench = _Bench(cfg, device, classes, compiled)
    peak = peak_tflops * 1e12 if peak_tflops else device_peak_flops()
    flops = objective_for(cfg).flops_per_image(bench.shape_net)
    out: dict[str, Any] = {"device": device_label(device), "model": cfg.model.name, "objective": cfg.objective.name,
                           "batch": cfg.data.batch_size, "img_size": cfg.model.img_size,
                           "precision": cfg.train.precision, "zero_stage": cfg.engine.zero_stage,
                           "grad_checkpointing": cfg.model.grad_checkpointing, "compile": compiled, "iters": iters,
                           "warmup": warmup, "rounds": rounds, "peak_flops": peak, "modes": {}, "ratios": {},
                           "params": sum(p.numel() for p in bench.shape_net.parameters())}
    why = no_timm_reference(bench.shape_net, objective_for(cfg), cfg.model.freeze) if timm and "model" in what \
        else None
    if why:
        print(f"bench: {why}: the timm row is skipped", flush=True)
    timed = bench.timed(what, timm and not why)
    timed_rounds = [t for t in timed if t.name != "engine" or "engine" in what]
    step_waits = _run_rounds(timed, timed_rounds, bench, warmup, rounds, iters)
    for t in timed_rounds:
        out["modes"][t.name] = t.result(iters, flops, peak)
    if "step" in what:
        step_t = next(t for t in timed if t.name == "step")
        out["modes"]["step"]["peak_mem_bytes"] = next(t for t in timed if t.name == "engine").peak_bytes
        out["modes"]["step"]["data_wait_frac"] = sum(step_waits) / sum(step_t.rounds)
    for t in timed:
        if t.name not in ("engine", "step"):
            t.free()
    if "loader" in what:
        out["modes"]["loader"] = bench.loader_only(iters, warmup, rounds, flops, peak)
    if bench.timm_params is not None:
        out["timm_params"] = bench.timm_params
    modes = out["modes"]
    if "timm" in modes:
        out["ratios"] = {f"{k}/timm": _paired_ratio(modes[k], modes["timm"]) for k in ("model", "engine", "step")
                         if k in modes}
    out["flops_per_image"] = flops
    out["device"] = device_label(device)  # again: DeepSpeed's CPU accelerator may have changed the thread count
    for t in timed:
        t.free()
    return out


def print_bench(res: dict[str, Any]) -> None:
    print(f"vitscale bench: {res['model']} ({res.get('params', 0) / 1e6:.2f}M params), {res['objective']}, "
          f"batch {res['batch']} at {res['img_size']}px, {res['precision']}, ZeRO-{res['zero_stage']}"
          f"{', grad ckpt' if res['grad_checkpointing'] else ''}{', compiled blocks' if res['compile'] else ''}")
    print(f"device: {res['device']}; {res['warmup']} warmup steps, median of {res['rounds']} rounds x "
          f"{res['iters']} steps; memory: "
          + ("torch.cuda.max_memory_allocated" if "cpu" not in res["device"] else "peak live tensor bytes"))
    rows = []
    labels = {"model": "model (ours, eager)" if not res["compile"] else "model (ours, compiled blocks)",
              "timm": "model (timm, eager)" if not res["compile"] else "model (timm, compiled blocks)",
              "engine": f"engine step (ZeRO-{res['zero_stage']}{', compiled' if res['compile'] else ''})",
              "loader": "loader only",
              "step": "full step (loader+engine)"}
    for name in ("model", "timm", "engine", "loader", "step"):
        r = res["modes"].get(name)
        if r is None:
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = fmt_gb(r["peak_mem_bytes"], 3) if r.get("peak_mem_bytes") is not None else (
            f"host {fmt_gb(r['worker_rss_bytes'], 3)}" if "worker_rss_bytes" in r else "n/a")
        extra = f"data wait {100 * r['data_wait_frac']:.0f}%" if "data_wait_frac" in r else ""
        if name == "loader":
            extra = "MFU column: the MFU this loader alone could feed"
        rows.append([labels[name], fmt_num(r["img_per_s"]), fmt_num(r["step_ms"], ".2f"), mfu, mem, extra])
    print_table(["mode", "img/s", "ms/step", "MFU", "peak mem GB", "notes"], rows)
    for k, v in res["ratios"].items():
        print(f"ratio {k}: {v:.2f}x")
    if res["peak_flops"] is None:
        print("MFU: n/a on this device (no known peak FLOP/s; pass --peak-tflops to set one)")
