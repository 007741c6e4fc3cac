"""The training loop: counted in optimizer steps, resumable exactly, the same code on 1 CPU or many GPUs."""
from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from vitscale import faults
from vitscale.config import Config, config_to_dict, save_config
from vitscale.data.pipeline import build_eval_loader, train_loader_from_config
from vitscale.data.augment import batch_augment_from_config
from vitscale.data.shards import resolve_shards
from vitscale.data.transforms import materialize, normalize
from vitscale.distributed import engine as eng
from vitscale.distributed.checkpoint import CheckpointManager, tag_for
from vitscale.distributed.env import DistEnv, detect_env
from vitscale.errors import TrainingDiverged
from vitscale.logging.images import mae_panels, save_mae_grid
from vitscale.logging.metrics import MetricsWriter, device_peak_flops, peak_memory_gb
from vitscale.logging.trackers import Tracker
from vitscale.models import create_model
from vitscale.models.flops import forward_flops
from vitscale.objectives import get_objective
from vitscale.objectives.supervised import count_correct
from vitscale.optim import lr_at, param_groups, peak_lr
from vitscale.train import model_init, validation
from vitscale.train_state import (Preemption, TrainState, Window, apply_global_batch, check_resumable, rng_state,
                                  set_rng_state)

PREEMPT_CHECK_EVERY = 10  # steps between checks for a preemption signal when losses are not checked every step


class Rollback(Exception):
    """Too many non-finite losses in a row: reload the last checkpoint and go on with a lower LR."""


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    m = cfg.model
    kwargs: dict[str, Any] = dict(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim,
                                  depth=m.depth, num_heads=m.num_heads, drop_path_rate=m.drop_path)
    if cfg.objective.name == "mae":
        name = m.name if m.name.startswith("mae_") else "mae_" + m.name
        decoder = {k: getattr(m, k) for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
                   if getattr(m, k) is not None}
        model = create_model(name, norm_pix_loss=cfg.objective.norm_pix_loss, **kwargs, **decoder)
    else:
        model = create_model(m.name, num_classes=num_classes, global_pool=m.global_pool, head_norm=m.head_norm,
                             **kwargs)
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model


def train(cfg: Config, local_rank_arg: Optional[int] = None) -> dict:
    """Run (or resume) the configured training; returns a summary dict."""
    env = detect_env(local_rank_arg=local_rank_arg)
    eng.setup(env)
    return Trainer(cfg, env).run()


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.dir) / cfg.run.name
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", env.rank, cfg.train.keep_last)
        self.objective = get_objective(cfg.objective.name)
        self.log = print if env.is_main else (lambda *a, **k: None)
        self.batches_seen = 0  # micro-batches taken from the stream by this process (fault injection counts them)
        self.decode_failures = 0  # JPEGs this rank's device could not decode (data.decode_on=device)
        self.bad_in_a_row = 0

    def warn(self, message: str) -> None:
        if self.env.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    # ----- setup -------------------------------------------------------------------------------------------
    def _data(self) -> int:
        cfg = self.cfg
        self.train_set = resolve_shards(cfg.data.train_shards, cfg.data.cache_dir)
        self.val_set = resolve_shards(cfg.data.val_shards, cfg.data.cache_dir) if cfg.data.val_shards else None
        num_classes = cfg.data.num_classes or self.train_set.num_classes or 0
        if cfg.objective.name == "supervised" and num_classes < 2:
            raise ValueError("supervised training needs data.num_classes (not in the shard manifest)")
        return num_classes

    def build_engine(self, num_classes: int, load_universal: bool = False) -> None:
        """The model, built sharded under ZeRO-3, wrapped in the DeepSpeed engine (``self.engine``)."""
        cfg = self.cfg
        self.global_batch = cfg.data.batch_size * cfg.train.grad_accum * self.env.world_size
        self.peak_lr = peak_lr(cfg.optim.lr, cfg.optim.blr, self.global_batch)
        with torch.device("meta"):  # the size alone, without memory or init cost
            num_params = sum(p.numel() for p in build_model(cfg, num_classes).parameters())
        ds_config = eng.build_ds_config(cfg, self.env.world_size, load_universal=load_universal,
                                        num_params=num_params)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank and every launch
        with eng.model_init_context(cfg, ds_config):
            model = build_model(cfg, num_classes)
        model_init.prepare(model, cfg, getattr(self, "init", None), log=self.log)  # model.init, head, freeze
        self.flops_per_image = 3 * forward_flops(model, mask_ratio=cfg.objective.mask_ratio
                                                 if cfg.objective.name == "mae" else None)
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
        self.engine = eng.initialize(model, groups, cfg, ds_config)

    def _resume(self, path: Optional[Path], universal: bool) -> tuple[TrainState, Optional[dict]]:
        if path is None:
            return TrainState(), None
        trainer_state, rank_state = self.ckpt.load(self.engine, path, universal=universal)
        state = TrainState.from_saved(trainer_state)
        self.log(f"resumed from {path} at step {state.step}")
        return state, rank_state

    # ----- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        apply_global_batch(cfg, env.world_size)
        path = self.ckpt.find(cfg.train.resume)
        saved = json.loads((path / "trainer_state.json").read_text()) if path is not None else None
        if saved is not None:  # refused before anything is written
            check_resumable(saved.get("config", {}), cfg, path)
            if saved["step"] >= cfg.train.steps:  # decided before building anything: a finished run costs nothing
                self.log(f"run '{cfg.run.name}' is already complete: step {saved['step']} of {cfg.train.steps} "
                         f"(results in {self.run_dir}); raise train.steps to continue")
                return {"step": saved["step"], "complete": True, "run_dir": str(self.run_dir)}
        num_classes = self._data()  # missing shards fail here, before the run directory is touched
        self.init = model_init.plan(cfg, lambda: build_model(cfg, num_classes), path is not None, self.log)
        self.augment = batch_augment_from_config(cfg, num_classes, env.rank)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        # Another world size or ZeRO stage than the checkpoint's: convert it (once) before the engine exists.
        universal = self.ckpt.prepare(path, env.world_size, cfg.engine.zero_stage) if path is not None else False
        self.build_engine(num_classes, load_universal=universal)
        state, rank_state = self._resume(path, universal)
        state.history.append([state.step, env.world_size])

        loader = train_loader_from_config(cfg, self.train_set.urls, env.rank, env.world_size,
                                          state=(rank_state or {}).get("data"))
        self.decode_failures = int((rank_state or {}).get("decode_failures", 0))
        batches = iter(loader)
        # Training randomness (drop-path, MAE masks) is per rank, and restored exactly on resume. It is set after
        # the loader's iterator exists because DataLoader draws its worker seed from the global RNG.
        if rank_state is not None and "rng" in rank_state:
            set_rng_state(rank_state["rng"])
        else:
            torch.manual_seed(cfg.run.seed * 1000 + 1 + env.rank)

        self.tracker = tracker = Tracker(
            enabled=env.is_main, mode=cfg.logging.wandb.mode, project=cfg.logging.wandb.project,
            entity=cfg.logging.wandb.entity, name=cfg.run.name, run_dir=self.run_dir, config=config_to_dict(cfg),
            run_id=state.tracker_id)
        state.tracker_id = tracker.run_id or state.tracker_id
        self.metrics = metrics = MetricsWriter(self.run_dir / "metrics.jsonl" if env.is_main else None)
        valid = validation.PeriodicValidation(cfg, self.val_set.urls if self.val_set else None, env.rank,
                                              env.world_size, self.ckpt.dir,
                                              lambda r: (metrics.write(r), tracker.log(r, r["step"])), self.log)
        preempt = Preemption()
        bar = None
        if env.is_main and cfg.train.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.train.steps, initial=state.step, desc=cfg.run.name, dynamic_ncols=True)

        self.engine.train()
        window = Window()
        preempted = False
        while state.step < cfg.train.steps:
            try:
                losses, batch, preempted = self.step(state, batches, window, preempt)
            except Rollback as why:
                self._rollback(state, num_classes, str(why))
                window = Window()
                if bar is not None:
                    bar.n = state.step
                    bar.refresh()
                continue
            state.step += 1
            state.samples += self.global_batch
            window.steps += 1

            last = state.step == cfg.train.steps
            if state.step % cfg.train.log_every == 0 or last:
                record = self._record(state, losses, window, loader)
                metrics.write(record)
                tracker.log(record, step=state.step)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['samples_per_s']:.0f}")
                window = Window()
            if bar is not None:
                bar.update(1)

            if cfg.objective.name == "mae" and (last or (cfg.logging.image_every
                                                         and state.step % cfg.logging.image_every == 0)):
                self._mae_images(batch, state.step, tracker)

            # Every rank must stop at the same step, so the signal is agreed on with an all-reduce. step() does
            # that with its loss check; without it, only every few steps (an all-reduce is a host sync on GPUs).
            if not cfg.train.skip_nonfinite and (last or state.step % min(cfg.train.log_every,
                                                                          PREEMPT_CHECK_EVERY) == 0):
                preempted = eng.any_rank(preempt.requested)
            best = valid.due(state.step, last) and valid.run(self.engine, state.step)  # train.eval_every
            if last or preempted or best or state.step % cfg.train.ckpt_every == 0:
                self._save(state, loader)
                valid.saved(tag_for(state.step), state.step)  # checkpoints/best
            if preempted:
                self.log(f"preemption signal: checkpointed at step {state.step}, exiting")
                break
            faults.inject("after_step", rank=env.rank, step=state.step)
        if bar is not None:
            bar.close()

        summary = {"step": state.step, "complete": state.step >= cfg.train.steps, "run_dir": str(self.run_dir)}
        if summary["complete"] and self.val_set is not None:
            summary.update(self.evaluate())
            metrics.write({"step": state.step, **{k: v for k, v in summary.items() if k.startswith("val_")}})
            tracker.summarize(summary)
        metrics.close()
        tracker.finish()
        self._report(summary)
        return summary

    def step(self, state: TrainState, batches, window: Window, preempt: Preemption) -> tuple[list, dict, bool]:
        """One optimizer step over train.grad_accum micro-batches; returns (losses, last batch, preempted).

        With train.skip_nonfinite, every rank learns after the forward whether any rank's loss is NaN/Inf (one
        small all-reduce, which also carries the preemption flag); such a micro-batch gets no backward on any
        rank and the next one takes its place, so NaN never reaches the weights."""
        cfg, rank = self.cfg, self.env.rank
        self.engine.set_lr(state.lr_scale * lr_at(state.step, self.peak_lr, cfg.optim.warmup_steps,
                                                  cfg.train.steps, cfg.optim.min_lr))
        losses, preempted = [], False
        while len(losses) < cfg.train.grad_accum:
            t0 = time.perf_counter()
            batch = next(batches)
            window.wait += time.perf_counter() - t0
            self.batches_seen += 1
            raw, bad = materialize(batch["image"], self.engine.device)
            self.decode_failures += bad
            labels = batch["label"].to(self.engine.device)
            images, labels = self.augment(normalize(raw), labels, batch.get("stream"))  # erasing, mixup/cutmix
            images = images.to(self.engine.dtype)
            loss, _ = self.objective(self.engine, images, labels, mask_ratio=cfg.objective.mask_ratio,
                                     label_smoothing=cfg.objective.label_smoothing)
            if faults.poison_loss(rank=rank, batch=self.batches_seen):
                loss = loss * float("nan")
            if cfg.train.skip_nonfinite:
                bad, asked = eng.all_reduce_sum([0.0 if bool(torch.isfinite(loss)) else 1.0,
                                                 1.0 if preempt.requested else 0.0])
                preempted = preempted or asked > 0
                if bad > 0:
                    self._skip_batch(state)
                    continue
            self.bad_in_a_row = 0
            self.engine.backward(loss)
            faults.inject("mid_step", rank=rank, step=state.step + 1)
            self.engine.step()
            losses.append(loss.detach())
        return losses, batch, preempted

    def _skip_batch(self, state: TrainState) -> None:
        state.nonfinite_losses += 1
        self.bad_in_a_row += 1
        limit = self.cfg.train.rollback_after
        self.warn(f"non-finite loss at step {state.step + 1} (micro-batch {self.batches_seen}): skipped on every "
                  f"rank ({self.bad_in_a_row} in a row; rollback at {limit})")
        if self.bad_in_a_row >= limit:
            raise Rollback(f"{self.bad_in_a_row} non-finite losses in a row at step {state.step + 1}")

    def _rollback(self, state: TrainState, num_classes: int, reason: str) -> None:
        """Reload weights and optimizer from the newest complete checkpoint and lower the LR for the rest of
        the run. The RNG and the data stream go on (the batches that diverged are not replayed)."""
        cfg = self.cfg
        path = self.ckpt.find("auto")
        if path is None:
            raise TrainingDiverged(f"{reason} and no checkpoint to roll back to: lower optim.lr (or optim.blr), "
                               "raise optim.warmup_steps, or check the data")
        if state.rollbacks >= cfg.train.max_rollbacks:
            raise TrainingDiverged(f"{reason}, after {state.rollbacks} rollback(s) already (train.max_rollbacks): "
                               "giving up; lower optim.lr (or optim.blr) or check the data")
        universal = self.ckpt.prepare(path, self.env.world_size, cfg.engine.zero_stage)
        self.engine.close()
        del self.engine
        gc.collect()
        self.build_engine(num_classes, load_universal=universal)
        saved, _ = self.ckpt.load(self.engine, path, universal=universal)
        self.engine.train()
        state.step, state.samples = saved["step"], saved["samples"]
        state.lr_scale *= cfg.train.rollback_lr_factor
        state.rollbacks += 1
        self.bad_in_a_row = 0
        self.warn(f"{reason}: rolled back to {path} (step {state.step}); the LR is scaled by {state.lr_scale:g} "
                  f"from now on (rollback {state.rollbacks} of at most {cfg.train.max_rollbacks})")
        self.metrics.write({"step": state.step, "event": "rollback", "reason": reason, "lr_scale": state.lr_scale,
                            "rollbacks": state.rollbacks})

    @torch.no_grad()
    def _mae_images(self, batch: dict, step: int, tracker: Tracker) -> None:
        """Every rank runs the forward (ZeRO-3 gathers parameters collectively); rank 0 draws and saves."""
        raw, _ = materialize(batch["image"][:self.cfg.logging.image_count], self.engine.device)
        images = normalize(raw).to(self.engine.dtype)
        self.engine.eval()
        with torch.random.fork_rng(devices=[]):  # the picture must not change the training's random stream
            _, pred, mask = self.engine(images, mask_ratio=self.cfg.objective.mask_ratio)
        self.engine.train()
        if self.env.is_main:
            panels = mae_panels(self.engine.module, images, pred, mask)
            path = save_mae_grid(panels, self.run_dir / "images" / f"mae_step_{step:08d}.png",
                                 title=f"{self.cfg.run.name}: step {step}, mask ratio {self.cfg.objective.mask_ratio}")
            tracker.log_image("mae_reconstruction", path, step)

    def _record(self, state: TrainState, losses: list, window: "Window", loader) -> dict:
        """One metrics line: the loss averaged over ranks, rates over the steps since the last line."""
        cfg = self.cfg
        bad_samples, bad_shards = loader.skipped()
        bad_samples += self.decode_failures
        loss_sum, bad_samples, bad_shards = eng.all_reduce_sum([float(torch.stack(losses).float().mean()),
                                                                bad_samples, bad_shards])
        elapsed = time.perf_counter() - window.start
        samples_per_s = window.steps * self.global_batch / elapsed
        return {"step": state.step, "samples": state.samples, "loss": loss_sum / self.env.world_size,
                "lr": state.lr_scale * lr_at(state.step - 1, self.peak_lr, cfg.optim.warmup_steps, cfg.train.steps,
                                             cfg.optim.min_lr),
                "grad_norm": self.engine.grad_norm(), "loss_scale": self.engine.loss_scale(),
                "samples_per_s": samples_per_s, "step_time": elapsed / window.steps,
                "data_wait_frac": window.wait / elapsed, "mem_gb": peak_memory_gb(), "mfu": self._mfu(samples_per_s),
                "data/skipped_samples": int(bad_samples), "data/skipped_shards": int(bad_shards),
                "nonfinite_losses": state.nonfinite_losses, "rollbacks": state.rollbacks}

    def _mfu(self, samples_per_s: float) -> Optional[float]:
        peak = device_peak_flops(self.cfg.logging.peak_tflops)
        if peak is None:
            return None
        return self.flops_per_image * samples_per_s / (peak * self.env.world_size)

    def _save(self, state: TrainState, loader) -> None:
        trainer_state = {**dataclasses.asdict(state), "world_size": self.env.world_size,
                         "config": config_to_dict(self.cfg)}
        rank_state = {"rng": rng_state(), "data": loader.state_dict(), "decode_failures": self.decode_failures}
        self.ckpt.save(self.engine, state.step, trainer_state, rank_state)

    # ----- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.cfg
        loader = build_eval_loader(self.val_set.urls, batch_size=cfg.data.batch_size, img_size=cfg.model.img_size,
                                   rank=self.env.rank, world_size=self.env.world_size,
                                   crop_pct=cfg.data.eval_crop_pct)
        self.engine.eval()
        correct, loss_sum, count = 0, 0.0, 0
        for batch in loader:
            images = normalize(batch["image"], self.engine.device).to(self.engine.dtype)
            labels = batch["label"].to(self.engine.device)
            if cfg.objective.name == "supervised":
                c, s = count_correct(self.engine, images, labels)
                correct, loss_sum = correct + c, loss_sum + s
            else:
                loss, _ = self.objective(self.engine, images, labels, mask_ratio=cfg.objective.mask_ratio)
                loss_sum += float(loss) * len(labels)
            count += len(labels)
        self.engine.train()
        correct, loss_sum, count = eng.all_reduce_sum([correct, loss_sum, count])
        out = {"val_images": int(count), "val_loss": loss_sum / max(count, 1)}
        if cfg.objective.name == "supervised":
            out["val_acc"] = correct / max(count, 1)
        return out

    def _report(self, summary: dict) -> None:
        if "val_acc" in summary:
            self.log(f"held-out accuracy: {100 * summary['val_acc']:.1f}% on {summary['val_images']} images "
                     f"(val loss {summary['val_loss']:.4f})")
        elif "val_loss" in summary:
            self.log(f"held-out loss: {summary['val_loss']:.4f} on {summary['val_images']} images")
        state = "complete" if summary["complete"] else "stopped early (resume with the same command)"
        self.log(f"run {state} at step {summary['step']}: config, metrics.jsonl and checkpoints in {self.run_dir}")
