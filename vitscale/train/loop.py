"""The training loop: counted in optimizer steps, resumable exactly, the same code on 1 CPU or many GPUs.

``Trainer.run`` reads top to bottom: set up (or resume), then per step: train, roll back if the loss diverged,
log, progress bar, pictures, preemption, checkpoint, fault hooks; then evaluate and report. Everything that
differs between objectives is the objective's (``vitscale.objectives``); the resume glue is ``train/resume.py``.
"""
from __future__ import annotations

import dataclasses
import gc
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from vitscale import faults
from vitscale.config.load import config_to_dict, save_config
from vitscale.config.resolve import resolve
from vitscale.config.schema import Config
from vitscale.data.augment import batch_augment_from_config
from vitscale.data.mix import resolve_train_set, shard_sets, train_stream_from_config
from vitscale.data.resume import read_rank_state, resume_stream_state
from vitscale.data.shards import check_labels, head_classes, resolve_shards
from vitscale.data.transforms import materialize
from vitscale.distributed import engine as eng, runlock, watchdog
from vitscale.distributed.checkpoint import CheckpointManager, tag_for
from vitscale.distributed.ds_config import zero3_sub_group_size
from vitscale.distributed.ema import ModelEma
from vitscale.distributed.env import DistEnv, detect_env
from vitscale.errors import TrainingDiverged
from vitscale.logging.metrics import MetricsWriter, device_peak_flops, peak_memory_gb
from vitscale.logging.progress import Progress
from vitscale.logging.trackers import Tracker
from vitscale.objectives import objective_for
from vitscale.optim import group_layout, lr_at, param_groups
from vitscale.pixels import normalize
from vitscale.train import model_init, validation
from vitscale.train.resume import ResumePoint, find_resume, load_state, seed_training_rng, settle_history
from vitscale.train.preemption import Preemption
from vitscale.train.state import StepOutput, TrainState, Window, rng_state

class Rollback(Exception):
    """Too many non-finite losses in a row: reload the last checkpoint and go on with a lower LR."""


def train(cfg: Config, local_rank_arg: Optional[int] = None, end_group: bool = False) -> dict:
    """Run (or resume) the configured training; returns a summary dict. ``end_group``: end the process group
    afterwards (the CLI does, so that a finished run exits 0 under every launcher: see ``engine.teardown``)."""
    env = detect_env(local_rank_arg=local_rank_arg)
    eng.setup(env, timeout_s=cfg.engine.timeout_s)
    with watchdog.watch(env, cfg.engine.timeout_s):  # the final barrier is watched too
        summary = Trainer(cfg, env).run()
        if end_group:
            eng.teardown()
    return summary


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        # Every attribute is created here; setup() and build_engine() fill in the ones that start as None.
        # The launch's batch sizes and LR, derived once; a length in epochs waits for the data's size (_open_data).
        self.settings = resolve(cfg, env.world_size, need_length=False)
        self.given_cfg = cfg
        self.cfg, self.env = self.settings.cfg, env
        self.run_dir = Path(self.cfg.run.dir) / self.cfg.run.name
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", env.rank, self.cfg.train.keep_last,
                                      read_rank=read_rank_state)
        self.objective = objective_for(self.cfg)
        self.log = print if env.is_main else (lambda *a, **k: None)
        self.warn = (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)) if env.is_main else (lambda m: None)
        self.num_classes = 0
        self.train_set = self.val_set = None  # ShardSets
        self.engine: Optional[eng.Engine] = None
        self.flops_per_image = 0.0
        self.group_layout: list[int] = []  # each optimizer group's size in elements (optim.group_layout)
        self.sub_group_size: Optional[int] = None  # ZeRO-3's (its shards' layout; saved, compared at resume)
        self.loader = None
        self.batches: Optional[Iterator[dict]] = None
        self.tracker: Optional[Tracker] = None
        self.metrics: Optional[MetricsWriter] = None
        self.progress: Optional[Progress] = None  # the bar of train.progress (rank 0)
        self.preemption: Optional[Preemption] = None  # signal handlers: installed by run() only
        self.init: Optional[model_init.InitPlan] = None  # model.init's fitted source (None: random init or resumed)
        self.augment = None  # data/augment.BatchAugment: random erasing, mixup/cutmix (fine-tuning)
        self.validation: Optional[validation.PeriodicValidation] = None  # train.eval_every, checkpoints/best
        self.batches_seen = 0  # micro-batches taken from the stream by this process (fault injection counts them)
        self.decode_failures = 0  # JPEGs this rank's device could not decode (data.decode_on=device)
        self.bad_in_a_row = 0
        self.ema = ModelEma.from_config(self.cfg)  # train.ema_decay (a no-op when 0)

    # ----- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        self._open_data()  # missing shards fail here, before anything is written; their size fixes train.epochs
        cfg = self.cfg
        point = find_resume(self.ckpt, cfg)  # a checkpoint of another model is refused before anything is written
        if point is not None and point.step >= cfg.train.steps:  # a finished run costs nothing ...
            if self.val_set is None or validation.final_figures_recorded(self.run_dir, point.step, self.objective):
                return self._already_complete(point)
            self.log("the run's last launch ended before its held-out evaluation: evaluating the final checkpoint")
            return self.finish(self.setup(point))  # ... but for what a kill during its final evaluation left out
        state = self.setup(point)
        window = Window()
        while state.step < cfg.train.steps:
            try:
                started = time.perf_counter()
                out = self.step(state, self.batches, window)
                state.step_s = time.perf_counter() - started
            except Rollback as why:
                window = self.rollback(state, str(why))
                continue
            state.step += 1
            state.samples += self.settings.global_batch
            self.ema.update(self.engine, state.step)
            window.steps += 1
            last = state.step == cfg.train.steps
            record = None
            if state.step % cfg.train.log_every == 0 or last:
                record = self.log_step(state, out, window)
                window = Window()
            self.progress.update(state.step, record)
            preempted = self.preemption.agreed(out.preempted, state.step, last, cfg.train.skip_nonfinite,
                                               cfg.train.log_every)
            paused = time.perf_counter()  # evaluation, checkpoint and picture: not the next metrics line's step time
            best = self.validation.due(state.step, last) and self.validation.run(self.engine, state.step, self.ema)
            if last or preempted or best or state.step % cfg.train.ckpt_every == 0:
                self.save(state)
                self.validation.saved(tag_for(state.step), state.step)  # checkpoints/best follows the best top-1
                preempted = preempted or self.preemption.during_save(last)
            if self.objective.images_due(state.step, last):  # after the checkpoint: a failing figure costs no state
                self.save_picture(out.batch, state.step)
            window.start += time.perf_counter() - paused
            if preempted:
                self.log(f"preemption signal: checkpointed at step {state.step}, "
                         f"exiting{self.preemption.since_signal()}")
                break
            faults.inject("after_step", rank=self.env.rank, step=state.step)
        return self.finish(state)

    # ----- setup -------------------------------------------------------------------------------------------
    def setup(self, point: Optional[ResumePoint]) -> TrainState:
        """Run directory, engine (resumed from ``point``), data stream, RNG and outputs, in that order (the data was
        opened by :meth:`run`)."""
        cfg, env = self.cfg, self.env
        # model.init and the augmentation keys are checked here too, before anything is written.
        self.init = model_init.plan(cfg, lambda: self.objective.build_model(self.num_classes), point is not None,
                                    self.log)
        self.augment = batch_augment_from_config(cfg, self.num_classes, env.rank, self.objective.classifies)
        runlock.acquire(self.run_dir, env)  # one writer per run directory (rank 0 holds it; all ranks agree)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # Another world size or ZeRO stage than the checkpoint's: convert it (once) before the engine exists.
        universal = self.ckpt.prepare(point.path, env.world_size, cfg.engine.zero_stage,
                                      zero3_sub_group_size(self._ds_config())) if point else False
        self.build_engine(self.num_classes, load_universal=universal)
        started = time.perf_counter()
        state, rank_state = load_state(self.ckpt, self.engine, point, universal, self.group_layout)
        if env.is_main:  # once the checkpoint has loaded: a resume that fails leaves the run's config as it was
            save_config(cfg, self.run_dir / "config.yaml", comment=self.settings.length_note)
        settle_history(self.ckpt, point, state, cfg, env.is_main, self.log, self.warn,
                       time.perf_counter() - started)
        ema_note = self.ema.start(self.engine, point.path if point else None)
        if ema_note:
            self.log(ema_note)
        state.history.append([state.step, env.world_size])
        stream = resume_stream_state(point.path, (rank_state or {}).get("data"), env.world_size,
                                     cfg.data.num_workers) if point else None
        self.loader = train_stream_from_config(cfg, self.train_set, env.rank, env.world_size, state=stream,
                                               num_classes=self.objective.label_classes(self.num_classes))
        self.decode_failures = int((rank_state or {}).get("decode_failures", 0))
        self.batches = iter(self.loader)
        seed_training_rng(rank_state, cfg.run.seed, env.rank)  # after iter(): see its docstring
        self._open_outputs(state)
        self.engine.train()
        return state

    def _open_data(self) -> None:
        cfg = self.cfg
        self.train_set = resolve_train_set(cfg.data.train_shards, cfg.data.cache_dir)  # one spec, or a mix
        self.settings = resolve(self.given_cfg, self.env.world_size, self.train_set.num_samples)
        self.cfg = cfg = self.settings.cfg
        self.objective = objective_for(cfg)
        if self.settings.length_note:
            self.log(f"run length from epochs: {self.settings.length_note}")
        self.val_set = resolve_shards(cfg.data.val_shards, cfg.data.cache_dir) if cfg.data.val_shards else None
        self.num_classes = head_classes(cfg.data.num_classes, self.train_set)[0]
        self.objective.check_data(self.num_classes)
        check_labels([*shard_sets(self.train_set), self.val_set], self.objective.label_classes(self.num_classes),
                     cfg.data.label_key)

    def _open_outputs(self, state: TrainState) -> None:
        """Tracker, metrics.jsonl, the preemption signal handlers and the progress bar."""
        cfg, env = self.cfg, self.env
        self.tracker = Tracker(
            enabled=env.is_main, mode=cfg.logging.wandb.mode, project=cfg.logging.wandb.project,
            entity=cfg.logging.wandb.entity, name=cfg.run.name, run_dir=self.run_dir, config=config_to_dict(cfg),
            run_id=state.tracker_id)
        state.tracker_id = self.tracker.run_id or state.tracker_id
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl" if env.is_main else None)
        self.preemption = Preemption(cfg.engine.preempt_grace_s)
        metrics, tracker = self.metrics, self.tracker
        self.validation = validation.PeriodicValidation(
            cfg, self.val_set.urls if self.val_set else None, env.rank, env.world_size, self.ckpt.dir,
            lambda r: (metrics.write(r), tracker.log(r, r["step"])), self.log, self.objective.classifies)
        self.progress = Progress(env.is_main and cfg.train.progress, cfg.train.steps, state.step, cfg.run.name)

    def _ds_config(self, load_universal: bool = False) -> dict:
        with torch.device("meta"):  # the size alone, without memory or init cost
            sizes = eng.ModelSizes.of(self.objective.build_model(self.num_classes))
        return eng.build_ds_config(self.cfg, self.env.world_size, load_universal=load_universal, sizes=sizes)

    def build_engine(self, num_classes: int, load_universal: bool = False) -> None:
        """The model, built sharded under ZeRO-3, wrapped in the DeepSpeed engine (``self.engine``)."""
        cfg = self.cfg
        ds_config = self._ds_config(load_universal)
        self.sub_group_size = zero3_sub_group_size(ds_config)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank and every launch
        with eng.model_init_context(cfg, ds_config):
            model = self.objective.build_model(num_classes)
        model_init.prepare(model, cfg, self.init, log=self.log)  # model.init, a fresh head, model.freeze
        self.flops_per_image = self.objective.flops_per_image(model)
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
        self.group_layout = group_layout(groups)  # saved with each checkpoint, compared at resume
        self.engine = eng.initialize(model, groups, cfg, ds_config)

    # ----- one step ----------------------------------------------------------------------------------------
    def step(self, state: TrainState, batches: Iterator[dict], window: Window) -> StepOutput:
        """One optimizer step over train.grad_accum micro-batches.

        With train.skip_nonfinite, every rank learns after the forward whether any rank's loss is NaN/Inf (one
        small all-reduce, which also carries the preemption flag); such a micro-batch gets no backward on any
        rank and the next one takes its place, so NaN never reaches the weights."""
        cfg, rank = self.cfg, self.env.rank
        self.engine.set_lr(self._lr(state, state.step))
        out = StepOutput(losses=[], metrics=[], batch={})
        while len(out.losses) < cfg.train.grad_accum:
            t0 = time.perf_counter()
            out.batch = next(batches)
            window.wait += time.perf_counter() - t0
            self.batches_seen += 1
            images, labels = self._to_device(out.batch)
            loss, metrics = self.objective(self.engine, images, labels)
            if faults.poison_loss(rank=rank, batch=self.batches_seen):
                loss = loss * float("nan")
            if cfg.train.skip_nonfinite:
                stop = self.preemption is not None and self.preemption.requested
                bad, stops = eng.all_reduce_sum([0.0 if bool(torch.isfinite(loss)) else 1.0, 1.0 if stop else 0.0])
                out.preempted = out.preempted or stops > 0
                if bad > 0:
                    self._skip_batch(state)
                    continue
            self.bad_in_a_row = 0
            self.engine.backward(loss)
            faults.inject("mid_step", rank=rank, step=state.step + 1)
            self.engine.step()
            out.losses.append(loss.detach())
            out.metrics.append({k: v.detach() for k, v in metrics.items()})
        return out

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded (if still JPEG bytes), normalised images in the engine's dtype, and labels, on its device."""
        raw, bad = materialize(batch["image"], self.engine.device)
        self.decode_failures += bad
        images, labels = normalize(raw), batch["label"].to(self.engine.device)
        if self.augment is not None:  # random erasing, mixup/cutmix: seeded from the batch's stream position
            images, labels = self.augment(images, labels, batch.get("stream"))
        return images.to(self.engine.dtype), labels

    def _lr(self, state: TrainState, step: int) -> float:
        cfg = self.cfg
        return state.lr_scale * lr_at(step, self.settings.peak_lr, cfg.optim.warmup_steps, cfg.train.steps,
                                      cfg.optim.min_lr, cfg.optim.schedule)

    # ----- non-finite losses -------------------------------------------------------------------------------
    def _skip_batch(self, state: TrainState) -> None:
        state.nonfinite_losses += 1
        self.bad_in_a_row += 1
        limit = self.cfg.train.rollback_after
        self.warn(f"non-finite loss at step {state.step + 1} (micro-batch {self.batches_seen}): skipped on every "
                  f"rank ({self.bad_in_a_row} in a row; rollback at {limit})")
        if self.bad_in_a_row >= limit:
            raise Rollback(f"{self.bad_in_a_row} non-finite losses in a row at step {state.step + 1}")

    def rollback(self, state: TrainState, reason: str) -> Window:
        """Reload weights and optimizer from the newest complete checkpoint and lower the LR for the rest of the run
        (the RNG and the data stream go on: the diverged batches are not replayed); returns a new metrics window."""
        cfg = self.cfg
        path = self.ckpt.find("auto")
        if path is None:
            raise TrainingDiverged(f"{reason} and no checkpoint to roll back to: lower optim.lr (or optim.blr), "
                                   "raise optim.warmup_steps, or check the data")
        if state.rollbacks >= cfg.train.max_rollbacks:
            raise TrainingDiverged(f"{reason}, after {state.rollbacks} rollback(s) already (train.max_rollbacks): "
                                   "giving up; lower optim.lr (or optim.blr) or check the data")
        universal = self.ckpt.prepare(path, self.env.world_size, cfg.engine.zero_stage,
                                      zero3_sub_group_size(self._ds_config()))
        self.engine.close()
        self.engine = None
        gc.collect()
        self.build_engine(self.num_classes, load_universal=universal)
        saved, _ = self.ckpt.load(self.engine, path, universal=universal)
        self.ema.start(self.engine, path)
        self.engine.train()
        state.step, state.samples = saved["step"], saved["samples"]
        state.lr_scale *= cfg.train.rollback_lr_factor
        state.rollbacks += 1
        self.bad_in_a_row = 0
        self.warn(f"{reason}: rolled back to {path} (step {state.step}); the LR is scaled by {state.lr_scale:g} "
                  f"from now on (rollback {state.rollbacks} of at most {cfg.train.max_rollbacks})")
        self.metrics.write({"step": state.step, "event": "rollback", "reason": reason, "lr_scale": state.lr_scale,
                            "rollbacks": state.rollbacks})
        self.progress.update(state.step)
        return Window()

    # ----- what happens after a step -----------------------------------------------------------------------
    def log_step(self, state: TrainState, out: StepOutput, window: Window) -> dict:
        """Write one metrics line (metrics.jsonl and the tracker) and return it."""
        record = self._record(state, out, window)
        self.metrics.write(record)
        self.tracker.log(record, step=state.step)
        return record

    def _record(self, state: TrainState, out: StepOutput, window: Window) -> dict:
        """One metrics line: the loss and the objective's metrics averaged over ranks, rates over the steps since
        the last line. The only host sync of the step's tensors is here, on log steps."""
        names = sorted(out.metrics[0]) if out.metrics else []
        means = torch.stack([torch.stack(out.losses).float().mean()]
                            + [torch.stack([m[k] for m in out.metrics]).float().mean() for k in names]).tolist()
        bad_samples, bad_shards = self.loader.skipped()
        sources = self.loader.source_samples()  # a mix's samples per source ({} for one spec)
        totals = eng.all_reduce_sum([bad_samples + self.decode_failures, bad_shards, *sources.values(), *means])
        bad_samples, bad_shards, taken, sums = *totals[:2], totals[2:2 + len(sources)], totals[2 + len(sources):]
        world = self.env.world_size
        elapsed = time.perf_counter() - window.start
        samples_per_s = window.steps * self.settings.global_batch / elapsed
        return {"step": state.step, "samples": state.samples, "loss": sums[0] / world,
                "lr": self._lr(state, state.step - 1),
                "grad_norm": self.engine.grad_norm(), "loss_scale": self.engine.loss_scale(),
                "samples_per_s": samples_per_s, "step_time": elapsed / window.steps,
                "data_wait_frac": window.wait / elapsed, "mem_gb": peak_memory_gb(), "mfu": self._mfu(samples_per_s),
                **{f"train/{k}": s / world for k, s in zip(names, sums[1:])},
                "data/skipped_samples": int(bad_samples), "data/skipped_shards": int(bad_shards),
                **{f"data/source_{name}_samples": int(n) for name, n in zip(sources, taken)},
                "nonfinite_losses": state.nonfinite_losses, "rollbacks": state.rollbacks}

    def _mfu(self, samples_per_s: float) -> Optional[float]:
        peak = device_peak_flops(self.cfg.logging.peak_tflops)
        return None if peak is None else self.flops_per_image * samples_per_s / (peak * self.env.world_size)

    @torch.no_grad()
    def save_picture(self, batch: dict, step: int) -> None:
        """The objective's picture of the current model. Every rank runs the forward (ZeRO-3 gathers parameters
        collectively); rank 0 draws, saves and logs it."""
        raw, _ = materialize(batch["image"][:self.cfg.logging.image_count], self.engine.device)
        images = normalize(raw).to(self.engine.dtype)
        self.engine.eval()
        # No random stream may move (CPU, and the GPU where MAE draws masks): a resume from this step must match.
        with torch.random.fork_rng(devices=[self.engine.device] if self.engine.device.type == "cuda" else []):
            picture = self.objective.visualize(self.engine, self.engine.module, images, step)
        self.engine.train()
        if picture is not None and self.env.is_main:
            path = picture.draw(picture.panels, self.run_dir / "images" / picture.filename, picture.title)
            self.tracker.log_image(picture.key, path, step)

    def save(self, state: TrainState) -> None:
        trainer_state = {**dataclasses.asdict(state), "world_size": self.env.world_size,
                         "config": config_to_dict(self.cfg), "param_groups": self.group_layout,
                         "zero3_sub_group_size": self.sub_group_size}
        rank_state = {"rng": rng_state(), "data": self.loader.state_dict(), "decode_failures": self.decode_failures,
                      **self.ema.state_dict()}
        path = self.ckpt.save(self.engine, state.step, trainer_state, rank_state)
        if self.ckpt.last_save:  # rank 0
            seconds, size = self.ckpt.last_save["seconds"], self.ckpt.last_save["bytes"]
            self.log(f"checkpoint {path.name}: {size / 2**30:.2f} GB written in {seconds:.1f} s "
                     f"({size / 2**20 / max(seconds, 1e-9):.0f} MB/s)")

    # ----- the end -----------------------------------------------------------------------------------------
    def finish(self, state: TrainState) -> dict:
        """Evaluate a complete run on the held-out shards, close the outputs and report."""
        self.progress.close()
        summary: dict[str, Any] = {"step": state.step, "complete": state.step >= self.cfg.train.steps,
                                   "run_dir": str(self.run_dir)}
        if summary["complete"] and self.val_set is not None:
            summary.update(self.validation.final(self.engine, state.step, self.objective, self.metrics.write))
            self.tracker.summarize(summary)
        self.metrics.close()
        self.tracker.finish()
        self._report(summary)
        return summary

    def _already_complete(self, point: ResumePoint) -> dict:
        self.log(f"run '{self.cfg.run.name}' is already complete: step {point.step} of {self.cfg.train.steps} "
                 f"(results in {self.run_dir}); raise train.steps to continue")
        return {"step": point.step, "complete": True, "run_dir": str(self.run_dir)}

    def _report(self, summary: dict) -> None:
        if "val_top1" in summary:
            self.log(f"held-out accuracy: {100 * summary['val_top1']:.1f}% on {summary['val_images']} images (val "
                     f"loss {summary['val_loss']:.4f})")
        elif "val_loss" in summary:
            self.log(f"held-out loss: {summary['val_loss']:.4f} on {summary['val_images']} images")
        state = "complete" if summary["complete"] else "stopped early (resume with the same command)"
        self.log(f"run {state} at step {summary['step']}: config, metrics.jsonl and checkpoints in {self.run_dir}")
