"""Range checks of single keys: each value the schema's type allows but the run cannot use is one line naming the key.

Called by ``load.check_consistency`` before its cross-key checks (a zero patch size must be refused before
``model.img_size % model.patch_size`` divides by it). Comparisons are written so that NaN fails them too
(``not lo <= x``), since YAML reads ``.nan`` and ``nan`` as floats.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from vitscale.config.schema import Config
from vitscale.errors import ConfigError
from vitscale.optim import SCHEDULES


def check_ranges(cfg: Config) -> None:
    """Every single-key range rule: model sizes, optimizer, data augmentation, logging and the run's name."""
    check_model_sizes(cfg)
    _check_optim(cfg)
    _check_data(cfg)
    _check_run_name(cfg.run.name)
    _at_least("train.eval_every", cfg.train.eval_every, 0)  # 0 = only at the end of the run
    _at_least("train.keep_last", cfg.train.keep_last, 0)  # 0 = keep all
    _at_least("model.head_init_std", cfg.model.head_init_std, 0, null="the layer's default")  # 0 = zeros
    # A rank waits this long for another: 0 or less fails the first collective (torch prints a C++ stack dump).
    _above("engine.timeout_s", cfg.engine.timeout_s, 0)
    _at_least("engine.preempt_grace_s", cfg.engine.preempt_grace_s, 0)
    _at_least("logging.image_every", cfg.logging.image_every, 0)  # 0 = only at the end of the run
    # The reconstruction grid shows the first image_count images of a batch: 0 would draw an empty batch.
    _at_least("logging.image_count", cfg.logging.image_count, 1)
    if cfg.logging.peak_tflops is not None:  # MFU divides by it
        _above("logging.peak_tflops", cfg.logging.peak_tflops, 0, null="from the built-in table")
    if not 0.0 <= cfg.objective.label_smoothing < 1.0:
        raise ConfigError(f"objective.label_smoothing must be in [0, 1), got {cfg.objective.label_smoothing}")


def _at_least(key: str, value: Optional[float], low: float, null: str = "") -> None:
    """``value >= low`` and finite (``null``, when given, says what null means: null is then allowed)."""
    if value is None and null:
        return
    finite = not isinstance(value, float) or math.isfinite(value)  # an int is finite (and may not fit a float)
    if value is None or not (finite and value >= low):
        also = f" (or null: {null})" if null else ""
        what = "" if finite else "a finite number "
        raise ConfigError(f"{key} must be {what}>= {low:g}{also}, got {value}")


def _above(key: str, value: Optional[float], low: float, null: str = "") -> None:
    """``value > low`` and finite (``null``: what null means, when null is allowed)."""
    if value is None and null:
        return
    if value is None or not (math.isfinite(value) and value > low):
        also = f" (or null: {null})" if null else ""
        raise ConfigError(f"{key} must be a finite number > {low:g}{also}, got {value}")


def _in_range(key: str, value: float, low: float, high: float, closed_low: bool, closed_high: bool) -> None:
    """``value`` in the interval, written as [low, high), (low, high], ... in the message."""
    ok_low = value >= low if closed_low else value > low
    ok_high = value <= high if closed_high else value < high
    if not (ok_low and ok_high):
        interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
        raise ConfigError(f"{key} must be in {interval}, got {value}")


def check_model_sizes(cfg: Config) -> None:
    """Sizes that override the variant's: null keeps the variant's, 0 or less builds no model (or a ViT without
    blocks, for depth)."""
    m = cfg.model
    for key in ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
                "decoder_num_heads"):
        _at_least(f"model.{key}", getattr(m, key), 1, null="the variant's")
    _at_least("model.representation_size", m.representation_size, 1, null="no pre-logits layer")


def _check_optim(cfg: Config) -> None:
    o = cfg.optim
    # optim.lr=0 is a deliberate "take a step without moving the weights" (tests/test_finetune.py), so 0 is allowed;
    # null means lr = blr x global batch / 256.
    _at_least("optim.lr", o.lr, 0, null="from optim.blr")
    _at_least("optim.blr", o.blr, 0)
    _at_least("optim.weight_decay", o.weight_decay, 0)
    _at_least("optim.grad_clip", o.grad_clip, 0)  # 0 = no clipping
    _at_least("optim.min_lr", o.min_lr, 0)  # a negative floor turns the decay into ascent (measured: LR -0.75)
    _in_range("optim.momentum", o.momentum, 0.0, 1.0, closed_low=True, closed_high=False)
    _in_range("optim.layer_decay", o.layer_decay, 0.0, 1.0, closed_low=False, closed_high=True)  # 1 = off
    _check_betas(o.betas)
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")


def _check_betas(betas: Any) -> None:
    numbers = [b for b in betas if isinstance(b, (int, float)) and not isinstance(b, bool)]
    if len(betas) != 2 or len(numbers) != 2 or not all(0.0 <= b < 1.0 for b in numbers):
        shown = repr(betas) if len(repr(betas)) <= 60 else repr(betas)[:57] + "..."
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {shown}")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    _at_least("data.num_classes", d.num_classes, 0)  # 0 = from the shard manifest
    _in_range("data.crop_min_scale", d.crop_min_scale, 0.0, 1.0, closed_low=False, closed_high=True)
    # Held-out images are resized to img_size / eval_crop_pct before the centre crop.
    _in_range("data.eval_crop_pct", d.eval_crop_pct, 0.0, 1.0, closed_low=False, closed_high=True)
    for key in ("mixup_prob", "mixup_switch_prob", "random_erasing"):  # probabilities
        _in_range(f"data.{key}", getattr(d, key), 0.0, 1.0, closed_low=True, closed_high=True)
    _at_least("data.mixup", d.mixup, 0)  # Beta(alpha, alpha): 0 = off
    _at_least("data.cutmix", d.cutmix, 0)
    _in_range("data.max_bad_fraction", d.max_bad_fraction, 0.0, 1.0, closed_low=True, closed_high=True)
    # checked by the loader too, but only once the run folder exists: here nothing is written yet
    _at_least("data.shards_in_flight", d.shards_in_flight, 1)
    _at_least("data.shuffle_buffer", d.shuffle_buffer, 0)


def _check_run_name(name: str) -> None:
    """The run lives in run.dir/run.name: an empty name, '.', '..' or a path would put it in (or above) run.dir
    itself, beside or over other runs."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ConfigError(f"run.name must be a non-empty folder name without '/' (and not '.' or '..'), "
                          f"got {name!r}")
