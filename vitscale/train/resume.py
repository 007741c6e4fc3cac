"""Checkpoint-resume glue of the training loop: which checkpoint to continue, whether this config may continue
it, and the per-rank state (RNG, data position) to restore. The files themselves are distributed/checkpoint.py's."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vitscale.config.load import config_to_dict
from vitscale.config.schema import Config
from vitscale.distributed.checkpoint import CheckpointManager, read_trainer_state, write_seconds
from vitscale.errors import ConfigError
from vitscale.train.preemption import grace_warning
from vitscale.train.state import TrainState, set_rng_state
from vitscale.train.validation import BEST, BEST_INFO

# Keys that change the model's architecture or what it learns: a checkpoint written under other values cannot
# be continued by this config. (Drop-path, checkpointing, LR, steps, data paths ... may change on resume.)
ARCHITECTURE_KEYS = ("model.name", "model.img_size", "model.patch_size", "model.embed_dim", "model.depth",
                     "model.num_heads", "model.global_pool", "model.decoder_embed_dim", "model.decoder_depth",
                     "model.decoder_num_heads", "model.decoder_mlp_ratio", "model.pos_embed", "model.class_token",
                     "model.mlp_ratio", "model.qkv_bias", "model.init_values", "model.fc_norm", "model.head_norm",
                     "model.qk_norm", "model.reg_tokens", "model.representation_size",
                     "objective.name",
                     "data.num_classes")
# Keys that change the optimizer's parameter groups or the files its state is in: a checkpoint's optimizer state
# cannot be loaded under other values (DeepSpeed fails deep inside the load, after minutes at real size).
OPTIMIZER_LAYOUT_KEYS = ("optim.name", "model.freeze", "train.precision")
# Settings a resume may change: the optimizer's groups take this config's values from the first step on.
OPTIMIZER_SETTING_KEYS = ("optim.weight_decay", "optim.layer_decay", "optim.betas", "optim.momentum")
# How the images are made: a resume may change them, and is told so (a recipe that now says data.interpolation=bicubic
# relaunched on a run written before the key existed, i.e. bilinear, switches mid-run).
IMAGE_SETTING_KEYS = ("data.interpolation", "data.crop_min_scale", "data.randaug", "data.mixup", "data.cutmix",
                      "data.random_erasing", "data.eval_crop_pct")


@dataclass
class ResumePoint:
    """A complete checkpoint this run continues from, and its trainer_state.json."""
    path: Path
    saved: dict
    notes: list = field(default_factory=list)  # what the resume changes, for the log

    @property
    def step(self) -> int:
        return int(self.saved["step"])


def find_resume(ckpt: CheckpointManager, cfg: Config) -> Optional[ResumePoint]:
    """The checkpoint ``train.resume`` names (None: start fresh); refused before anything is written if it was
    written for another model."""
    path = ckpt.find(cfg.train.resume)
    if path is None:
        return None
    saved = read_trainer_state(path)
    check_resumable(saved.get("config", {}), cfg, path)
    notes = []
    for what, keys in (("optimizer", OPTIMIZER_SETTING_KEYS), ("image", IMAGE_SETTING_KEYS)):
        changed = _differences(saved.get("config", {}), cfg, keys)
        if changed:
            notes.append(f"resuming with other {what} settings than the checkpoint's ({'; '.join(changed)}): this "
                         f"config's apply from step {int(saved['step']) + 1}")
    return ResumePoint(path, saved, notes)


def check_resumable(saved_config: dict[str, Any], cfg: Config, path: Path) -> None:
    """Refuse a checkpoint written for another model, naming every key that differs. A key the checkpoint's
    config lacks (written before the key existed) had its default value."""
    diffs = _differences(saved_config, cfg, ARCHITECTURE_KEYS)
    if diffs:
        raise ConfigError(f"checkpoint {path} was written for another model ({'; '.join(diffs)}): use a new "
                          f"run.name to start fresh, or train.resume=never")
    diffs = _differences(saved_config, cfg, OPTIMIZER_LAYOUT_KEYS)
    old_decay = saved_config.get("optim", {}).get("layer_decay", 1.0)
    if (old_decay == 1.0) != (cfg.optim.layer_decay == 1.0):  # on: a parameter group per layer; off: one
        diffs.append(f"optim.layer_decay={old_decay!r} there, {cfg.optim.layer_decay!r} here")
    if diffs:
        raise ConfigError(f"checkpoint {path} holds optimizer state this config cannot load ({'; '.join(diffs)}): "
                          f"resume with the checkpoint's values, or start a new run from its weights with "
                          f"model.init={path}")


def _differences(saved_config: dict[str, Any], cfg: Config, keys: tuple[str, ...]) -> list[str]:
    """'key=old there, new here' for each of KEYS whose value differs (a key the checkpoint's config lacks, written
    before the key existed, had its default)."""
    now, default = config_to_dict(cfg), config_to_dict(Config())
    diffs = []
    for key in keys:
        section, name = key.split(".")
        old, new = saved_config.get(section, {}).get(name, default[section][name]), now[section][name]
        if old != new:
            diffs.append(f"{key}={old!r} there, {new!r} here")
    return diffs


def start_over(ckpt: CheckpointManager) -> list[Path]:
    """Rank 0, for train.resume=never in a run folder that has checkpoints: they are another history of this run,
    so they are set aside (renamed, never deleted) with the best-checkpoint record, metrics.jsonl and images/. Otherwise keep_last counted them
    as newer and deleted the new run's first checkpoint as soon as it was written, ``latest`` named it anyway, and
    the next train.resume=auto went back to the old run. Returns where the checkpoints went."""
    moved = ckpt.branch(0)
    stamp = int(time.time())
    # the old history's best, its metrics and pictures: the new run has none yet (a plot mixed both runs' steps)
    for path in (ckpt.dir / BEST, ckpt.dir / BEST_INFO, ckpt.dir.parent / "metrics.jsonl", ckpt.dir.parent / "images"):
        if path.exists():
            os.replace(path, path.with_name(f"{path.name}.replaced-{stamp}"))
    return moved


def settle_history(ckpt: CheckpointManager, point: Optional[ResumePoint], state: TrainState, cfg: Config,
                   is_main: bool, log: Callable[[str], None], warn: Callable[[str], None], seconds: float) -> None:
    """Once the checkpoint has loaded (or a run starts over): what this launch continues, said, and the
    checkpoints of another history of the run set aside (rank 0), so pruning and the next auto-resume see this one."""
    if point is None:
        if cfg.train.resume == "never" and is_main and (moved := start_over(ckpt)):
            warn(f"train.resume=never starts this run over: its {len(moved)} earlier checkpoint(s) were moved "
                 f"aside, e.g. to {moved[-1]}")
        return
    log(f"resumed from {point.path} at step {state.step} (loaded in {seconds:.1f} s)")
    if is_main and (moved := ckpt.branch(state.step, point.path)):
        warn(f"resuming at step {state.step} starts a new branch of this run: its {len(moved)} later "
             f"checkpoint(s) were moved aside, e.g. to {moved[-1]}")
    late = grace_warning(state.step_s, write_seconds(point.path), cfg.engine.preempt_grace_s)
    for note in filter(None, [*point.notes, late]):
        warn(note)


def seed_training_rng(rank_state: Optional[dict], seed: int, rank: int) -> None:
    """Training randomness (drop-path, MAE masks) is per rank, and restored exactly on resume. Call it after the
    loader's iterator exists: DataLoader draws its worker seed from the global RNG."""
    if rank_state is not None and "rng" in rank_state:
        set_rng_state(rank_state["rng"])
    else:
        torch.manual_seed(seed * 1000 + 1 + rank)


def check_group_layout(saved: dict[str, Any], layout: list[int], path: Path) -> None:
    """Refuse, before DeepSpeed's load (minutes at real size, then an error deep inside it, or under ZeRO 1-2
    moments assigned to the wrong parameters), a checkpoint whose optimizer groups this run's model does not make:
    written by a vitscale that grouped a model's parameters otherwise, or by an objective whose model changed."""
    old = saved.get("param_groups")
    if isinstance(old, list) and layout and old != layout:
        raise ConfigError(f"checkpoint {path} holds optimizer state for {len(old)} parameter group(s) of {old} "
                          f"elements, but this run's model makes {len(layout)} of {layout} (the model's "
                          f"no_weight_decay() or trainable parameters changed since it was written): start a new "
                          f"run from its weights with model.init={path}")


def _group_mismatch(error: Exception, path: Path) -> Optional[ConfigError]:
    """torch's and DeepSpeed's errors for optimizer state of other groups (a checkpoint older than its layout
    record), as one line."""
    text = str(error)
    # torch: "...a parameter group that doesn't match the size of optimizer's group"; DeepSpeed ZeRO 1-2 (0.19):
    # "The ZeRO checkpoint parameter-alignment layout does not match ..." (its flat partitions are sized by group)
    if any(words in text for words in ("parameter group", "param_groups", "param group",
                                       "parameter-alignment layout does not match")):
        return ConfigError(f"checkpoint {path} holds optimizer state for other parameter groups than this run's "
                           f"model makes ({text.splitlines()[0] if text else type(error).__name__}; under ZeRO-3 "
                           f"also another engine.ds_config.zero_optimization.sub_group_size than it was written "
                           f"with): resume with its settings, or start a new run from its weights with "
                           f"model.init={path}")
    return None


def load_state(ckpt: CheckpointManager, engine, point: Optional[ResumePoint], universal: bool,
               layout: Optional[list[int]] = None) -> tuple[TrainState, Optional[dict]]:
    """(train state, this rank's saved state or None) after loading ``point`` into ``engine``; ``layout``: this
    run's optimizer groups (:func:`vitscale.optim.group_layout`), checked against the checkpoint's first."""
    if point is None:
        return TrainState(), None
    check_group_layout(point.saved, layout or [], point.path)
    try:
        trainer_state, rank_state = ckpt.load(engine, point.path, universal=universal)
    except (ValueError, RuntimeError, KeyError, IndexError) as e:
        mismatch = _group_mismatch(e, point.path)
        if mismatch is None:
            raise
        raise mismatch from None
    state = TrainState.from_saved(trainer_state)
    if Path(point.path).resolve().parent != Path(ckpt.dir).resolve():
        # another run's checkpoint (train.resume=PATH of another run.name): this run is a fork of it, so its
        # wandb run is a new one, not the other run's continued (their steps and configs would merge)
        state.tracker_id = None
    return state, rank_state
