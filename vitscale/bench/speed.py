"""``vitscale bench``: training throughput of the model alone, the engine, the loader and the full step.

Modes (``--what``, comma-separated; default all four):
  model   our model in plain PyTorch, eager (or blocks compiled with ``--compile``), synthetic batch already on
          the device, AdamW, autocast in the config's precision — and timm's model of the same configuration
          measured the same way in the same run (``--no-timm`` to skip); their ratio is printed.
  engine  the real training step through ``vitscale.distributed.engine`` (DeepSpeed ZeRO as configured) on a
          synthetic uint8 batch: normalise, cast, objective, ``engine.backward``, ``engine.step``.
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
import gc
import statistics
import time
from typing import Any, Callable, Optional

import torch

from vitscale.bench.common import autocast_dtype, fmt_gb, fmt_num, print_table, sync
from vitscale.bench.memory import LiveTensorMemory
from vitscale.config import Config

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


def _model_step(cfg: Config, model: torch.nn.Module, device: torch.device, num_classes: int, seed: int):
    """Plain-PyTorch training step closure: autocast forward + objective, backward, (clip), AdamW step."""
    from vitscale.objectives import objective_for
    from vitscale.optim import param_groups

    model.to(device).train()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay), lr=1e-5,
                            betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay, **fused)
    objective = objective_for(cfg)
    amp = autocast_dtype(cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
    g = torch.Generator().manual_seed(seed)
    B, S = cfg.data.batch_size, cfg.model.img_size
    x = torch.randn(B, 3, S, S, generator=g).to(device)
    y = torch.randint(0, max(num_classes, 1), (B,), generator=g).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = objective(model, x, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if cfg.optim.grad_clip > 0:  # the engine clips too (gradient_clipping), so the comparison is like for like
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return step


def _compile_blocks(model: torch.nn.Module) -> None:
    from vitscale.bench.timm_ref import block_lists

    for blk in block_lists(model):
        blk.compile()  # in place: parameter names unchanged; the glue outside the blocks stays eager


def _loader(cfg: Config, env) -> Any:
    from vitscale.data.pipeline import train_loader_from_config
    from vitscale.data.shards import resolve_shards

    urls = resolve_shards(cfg.data.train_shards, cfg.data.cache_dir).urls
    return train_loader_from_config(cfg, urls, env.rank, env.world_size)


def _workers_rss() -> int:
    import psutil

    return sum(c.memory_info().rss for c in psutil.Process().children(recursive=True))


def run_bench(cfg: Config, what: tuple[str, ...] = MODES, iters: int = 10, warmup: int = 3, rounds: int = 3,
              timm: bool = True, compile_blocks: bool = False, peak_tflops: Optional[float] = None,
              num_classes: Optional[int] = None) -> dict[str, Any]:
    """Run the requested modes; returns the JSON-able results (also printed as a table by :func:`print_bench`)."""
    from vitscale.bench.common import bench_device, device_label, resolve_num_classes
    from vitscale.logging.metrics import device_peak_flops
    from vitscale.objectives import build_model, objective_for

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
    if "loader" in what or "step" in what:
        from vitscale.data.shards import resolve_shards

        shard_classes = resolve_shards(cfg.data.train_shards, cfg.data.cache_dir).num_classes
        # the same order as the trainer: data.num_classes, else the shard manifest
        classes, _ = resolve_num_classes(cfg, num_classes or cfg.data.num_classes or shard_classes)
    else:
        classes, _ = resolve_num_classes(cfg, num_classes)
    peak = peak_tflops * 1e12 if peak_tflops else device_peak_flops()
    B = cfg.data.batch_size
    out: dict[str, Any] = {"device": device_label(device), "model": cfg.model.name, "objective": cfg.objective.name,
                           "batch": B, "img_size": cfg.model.img_size, "precision": cfg.train.precision,
                           "zero_stage": cfg.engine.zero_stage, "grad_checkpointing": cfg.model.grad_checkpointing,
                           "compile": compile_blocks, "iters": iters, "warmup": warmup, "rounds": rounds,
                           "peak_flops": peak, "modes": {}, "ratios": {}}

    # ----- model (ours and timm) and engine: alternate rounds on CPU, one after another on GPU -------------------
    with torch.device("meta"):  # configuration, FLOPs and parameter count without memory
        shape_net = build_model(cfg, classes)
    flops = objective_for(cfg).flops_per_image(shape_net)
    out["params"] = sum(p.numel() for p in shape_net.parameters())
    timed: list[Timed] = []

    def setup_ours():
        torch.manual_seed(cfg.run.seed)
        net = build_model(cfg, classes)
        if compile_blocks:
            _compile_blocks(net)
        return _model_step(cfg, net, device, classes, seed=0)

    def setup_timm():
        from vitscale.bench.timm_ref import timm_reference

        torch.manual_seed(cfg.run.seed)
        net = timm_reference(shape_net, cfg.model.drop_path)
        out["timm_params"] = sum(p.numel() for p in net.parameters())
        if cfg.model.grad_checkpointing and hasattr(net, "set_grad_checkpointing"):
            net.set_grad_checkpointing(True)
        if compile_blocks:
            _compile_blocks(net)
        return _model_step(cfg, net, device, classes, seed=0)  # the same batch as ours

    runner: dict[str, Any] = {}

    def setup_engine():
        from vitscale.bench.engine_step import EngineStep, synthetic_batch

        r = runner["engine"] = EngineStep(cfg, classes)
        images, labels = synthetic_batch(cfg, classes)
        return lambda: r.step(images, labels)

    waits: list[float] = []
    prefetch = 2 * max(cfg.data.num_workers, 1)  # DataLoader's default prefetch_factor x workers

    def setup_step():
        runner["batches"] = iter(_loader(cfg, runner["engine"].env))

        def loader_step():
            t0 = time.perf_counter()
            batch = next(runner["batches"])
            waits.append(time.perf_counter() - t0)
            runner["engine"].step(batch["image"], batch["label"])
        return loader_step

    def drain():  # batches prefetched while other modes ran would hide the loader's real cost
        for _ in range(prefetch):
            next(runner["batches"])
        for _ in range(max(cfg.data.num_workers, 1)):
            runner["step"]()  # back to steady state: workers busy while the engine computes
        waits.clear()

    from vitscale.distributed.env import detect_env

    world = detect_env().world_size
    if "model" in what:
        timed.append(Timed("model", device, setup_ours, B))
        if timm:
            timed.append(Timed("timm", device, setup_timm, B))
    eng_t = None
    if "engine" in what or "step" in what:
        eng_t = Timed("engine", device, setup_engine, B * cfg.train.grad_accum * world, devices=world)
        timed.append(eng_t)
    if "step" in what:
        step_t = Timed("step", device, setup_step, B * cfg.train.grad_accum * world, track=False,
                       pre_round=drain, devices=world)
        timed.append(step_t)
    step_waits: list[float] = []
    timed_rounds = [t for t in timed if t.name != "engine" or "engine" in what]
    if device.type == "cpu":
        for t in timed:
            t.prepare(warmup)
            if t.name == "step":
                runner["step"] = t.fn
        for r in range(rounds):
            for t in (timed_rounds if r % 2 == 0 else timed_rounds[::-1]):  # alternate: no one is always first
                t.round(iters)
                if t.name == "step":
                    step_waits.append(sum(waits))
        for t in timed:
            t.measure_memory()
    else:
        for t in timed:
            t.prepare(warmup)
            if t.name == "step":
                runner["step"] = t.fn
            t.measure_memory()
            if t in timed_rounds:
                for _ in range(rounds):
                    t.round(iters)
                    if t.name == "step":
                        step_waits.append(sum(waits))
            if t.name not in ("engine", "step"):
                t.free()  # the GPU's peak counter sees everything allocated: measure one model at a time
    for t in timed_rounds:
        out["modes"][t.name] = t.result(iters, flops, peak)
    if "step" in what:
        out["modes"]["step"]["peak_mem_bytes"] = eng_t.peak_bytes  # the same engine step, fed by the loader
        out["modes"]["step"]["data_wait_frac"] = sum(step_waits) / sum(step_t.rounds)
    for t in timed:
        if t.name not in ("engine", "step"):
            t.free()

    # ----- loader alone (the same iterator as the full step, if there was one) ----------------------------------
    if "loader" in what:
        it = runner.get("batches")
        if it is None:
            env = runner["engine"].env if "engine" in runner else detect_env()
            it = runner["batches"] = iter(_loader(cfg, env))
            for _ in range(warmup):
                next(it)
        secs = []
        for _ in range(rounds):
            for _ in range(prefetch):  # what the workers prefetched meanwhile is not the loader's speed
                next(it)
            t0 = time.perf_counter()
            for _ in range(iters):
                next(it)
            secs.append(time.perf_counter() - t0)
        img_s = B * iters / statistics.median(secs)
        out["modes"]["loader"] = {"img_per_s": img_s, "step_ms": 1000 * statistics.median(secs) / iters,
                                  "mfu": flops * img_s / peak if (flops and peak) else None,
                                  "peak_mem_bytes": None, "worker_rss_bytes": _workers_rss(), "rounds_s": secs}
    modes = out["modes"]
    if "timm" in modes:
        base = modes["timm"]["img_per_s"]
        out["ratios"] = {f"{k}/timm": modes[k]["img_per_s"] / base for k in ("model", "engine", "step") if k in modes}
    out["flops_per_image"] = flops
    out["device"] = device_label(device)  # again: DeepSpeed's CPU accelerator may have changed the thread count
    for t in timed:
        t.free()
    runner.clear()
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
              "engine": f"engine step (ZeRO-{res['zero_stage']})", "loader": "loader only",
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
