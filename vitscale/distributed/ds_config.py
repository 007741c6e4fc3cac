"""DeepSpeed's JSON config, made from ours: users never hand-write it (``engine.ds_config`` overrides last).

A pure function of the config, the world size and the model's size, without importing DeepSpeed, so the memory
planner (bench/plan.py) and tests build exactly what the engine (distributed/engine.py) hands DeepSpeed.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from vitscale.config.resolve import global_batch
from vitscale.config.schema import Config
from vitscale.distributed.zero_tuning import ModelSizes, bucket_elems, gradient_bucket, zero3_settings
from vitscale.errors import ConfigError


def build_ds_config(cfg: Config, world_size: int, load_universal: bool = False,
                    num_params: Optional[int] = None, sizes: Optional[ModelSizes] = None) -> dict:
    """Our config -> DeepSpeed's JSON config (users never hand-write it; engine.ds_config overrides last).

    `load_universal`: the checkpoint to resume was converted to DeepSpeed's universal layout (it was written at
    another world size or ZeRO stage); DeepSpeed only reads that layout when its config says so at initialize.
    `num_params`: the model's size. DeepSpeed allocates its gradient buckets at their full configured size, so a
    bucket larger than the model only wastes memory (5e8 elements = 1.9 GB in fp32 for a 1M-parameter model).
    `sizes`: the model's parameter count, width and block size (``ModelSizes.of(meta_model)``); ZeRO-3's
    prefetch, persistence, live-parameter and bucket settings are sized from them (zero_tuning.py).
    """
    zero: dict[str, Any] = {"stage": cfg.engine.zero_stage}
    num_params = sizes.params if sizes is not None else num_params
    if cfg.engine.zero_stage >= 1:
        bucket = bucket_elems(5e8 if num_params is None else min(5e8, max(1e6, num_params)))
        bucket = gradient_bucket(sizes) if sizes is not None else bucket
        zero.update(contiguous_gradients=True, overlap_comm=torch.cuda.is_available(),
                    reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if cfg.engine.zero_stage == 3 and sizes is not None:
        zero.update(zero3_settings(sizes, world_size))
    offload = {"device": "nvme", "nvme_path": cfg.engine.nvme_path} if cfg.engine.nvme_path else {"device": "cpu"}
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {**offload, "pin_memory": torch.cuda.is_available()}
    if cfg.engine.offload_params:
        zero["offload_param"] = {**offload, "pin_memory": torch.cuda.is_available()}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": global_batch(cfg, world_size),
        "zero_optimization": zero,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if cfg.train.precision == "bf16":
        # DeepSpeed's bf16 overflow scan runs ~5 small kernels per gradient tensor and a host sync every step:
        # 41 ms of host time per ViT-L/16 step on an H200, while the GPU idled (docs/benchmarks.md, 2026-12-04).
        # bf16 has fp32's range, and train.skip_nonfinite already catches a NaN/Inf loss before its backward.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": not cfg.train.skip_nonfinite}
    elif cfg.train.precision == "fp16":
        if not torch.cuda.is_available():
            raise ValueError("train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator runs fp32 and bf16)")
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return _deep_merge(ds, cfg.engine.ds_config)


def _deep_merge(base: dict, extra: dict, path: str = "") -> dict:
    out = dict(base)
    for k, v in extra.items():
        here = f"{path}{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v, here + ".")
        else:
            out[k] = _same_kind(here, out.get(k), v)
    return out


def _same_kind(path: str, ours: Any, theirs: Any) -> Any:
    """An engine.ds_config override of a value vitscale sets must be of its kind: DeepSpeed checks some keys'
    types at initialize, others not at all (steps_per_print="abc" failed with a TypeError at the first step).
    A number written as YAML reads "5e8" (a string: YAML wants "5.0e+8") is taken as the number."""
    if theirs is None:  # null: DeepSpeed's own default for the key
        return theirs
    if isinstance(ours, bool):
        if isinstance(theirs, bool) or theirs in (0, 1):  # DeepSpeed reads 0/1 as false/true
            return bool(theirs)
        raise ConfigError(f"engine.ds_config.{path} must be true or false, got {theirs!r}")
    if isinstance(ours, (int, float)):
        number = theirs
        if isinstance(theirs, str):
            try:
                number = float(theirs)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"engine.ds_config.{path} must be a number (vitscale's is {ours}), got {theirs!r}")
        return int(number) if isinstance(ours, int) and float(number).is_integer() else number
    return theirs


DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's default zero_optimization.sub_group_size


def zero3_sub_group_size(ds_config: dict) -> Optional[int]:
    """The ZeRO-3 optimizer's sub-group size in this DeepSpeed config (None at other stages): its checkpoint shards
    hold one flat state per sub-group, so a checkpoint written under another size loads only through the universal
    layout."""
    zero = ds_config.get("zero_optimization", {})
    return int(zero.get("sub_group_size", DEEPSPEED_SUB_GROUP_SIZE)) if zero.get("stage") == 3 else None
