"""The one place that imports DeepSpeed.

Everything parallel (process group, ZeRO wrapping, mixed precision, sharded save/load) is applied here,
so model code stays plain PyTorch, the way torchtitan keeps model and parallelism apart.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import logging
import os
from pathlib import Path
import sys
from typing import Any, Iterable, Optional

import torch

from vitscale.config.schema import Config
from vitscale.distributed.child import run_in_fresh_python
from vitscale.distributed.compile import compile_blocks, transformer_blocks
from vitscale.distributed.env import DistEnv, rendezvous_error
from vitscale.distributed.fp32_masters import masters_by_name, unfused_masters
from vitscale.distributed.host import return_freed_host_memory, unlink_cpu_allreduce_segment
from vitscale.distributed.recorded_writes import writes_recorded
from vitscale.distributed.safeload import safe_load, weights_only_loads
from vitscale.distributed.universal import make_stage_independent, restore_param_groups
from vitscale.distributed.zero_tuning import ModelSizes  # noqa: F401 (re-exported: engine.ModelSizes)
from vitscale.optim.optimizers import build_optimizer

_deepspeed = None  # imported lazily by setup(): DS_ACCELERATOR must be set before the import


def _ds():
    if _deepspeed is None:
        raise RuntimeError("vitscale.distributed.engine.setup() must be called before using the engine")
    return _deepspeed


def setup(env: DistEnv, timeout_s: Optional[float] = None) -> None:
    """Export the rendezvous variables, pick the accelerator and start the process group (idempotent).

    `timeout_s` (engine.timeout_s): a collective that does not complete in this time fails instead of waiting
    for torch's default 30 minutes (gloo raises; NCCL's watchdog ends the process). A rendezvous that times out
    (a rank never started) is one line naming the missing ranks."""
    global _deepspeed
    for key, value in env.as_environ().items():
        os.environ[key] = value
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator + gloo: the same code path as GPUs, testable on a laptop.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return_freed_host_memory()  # distributed/host.py
    os.environ.setdefault("DS_BUILD_OPS", "0")
    import deepspeed  # noqa: WPS433 (deliberately lazy, see above)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU hosts
    _deepspeed = deepspeed
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        with _quiet_stdout():  # DeepSpeed prints a line per process about its CPU shared-memory op
            kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
            try:
                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **kwargs)
            except torch.distributed.DistError as e:  # the store's "1/2 clients joined", a timeout, a port in use
                explained = rendezvous_error(e, env, timeout_s)
                if explained is None:
                    raise
                raise explained from None
        if not torch.cuda.is_available():
            unlink_cpu_allreduce_segment()


# Re-exported: callers use them as engine.device(), engine.all_reduce_sum(), engine.build_ds_config(), ...
from vitscale.distributed.collectives import (all_reduce_sum, any_rank, barrier, device,  # noqa: E402,F401
                                             first_failure, teardown)
from vitscale.distributed.ds_config import build_ds_config  # noqa: E402,F401


def model_init_context(cfg: Config, ds_config: dict):
    """ZeRO-3 builds the model already sharded so a model larger than one rank's memory can be created."""
    if cfg.engine.zero_stage == 3:
        return _ds().zero.Init(config_dict_or_path=ds_config)
    return contextlib.nullcontext()


def gathered_params(params: Iterable[torch.nn.Parameter], modifier_rank: Optional[int] = 0):
    """Whole parameters for the duration of the block. Under ZeRO-3's zero.Init each rank holds a partition: the
    full tensors are gathered, and what ``modifier_rank`` writes into them is broadcast and re-partitioned on exit
    (every rank must enter). Plain tensors (ZeRO 0-2, before the engine) need nothing."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    return _ds().zero.GatheredParameters(params, modifier_rank=modifier_rank)


# Param-group settings the config owns (optim.weight_decay, betas, momentum, layer_decay's lr_scale); the rest of a
# group's state (AdamW's step count, DeepSpeed's bookkeeping) comes from the checkpoint.
CONFIG_GROUP_KEYS = ("weight_decay", "lr_scale", "betas", "momentum")


class Engine:
    """A thin, explicit surface over DeepSpeedEngine: what the trainer needs and nothing more."""

    def __init__(self, ds_engine: Any):
        self.ds = ds_engine
        # DeepSpeed keeps the global gradient norm only in its ZeRO and mixed-precision optimizers; at ZeRO-0 it
        # clips with a norm it drops, so the norm (before clipping, as DeepSpeed reports it) is measured here.
        self._measure_norm = ds_engine.zero_optimization_stage() == 0 and not ds_engine.fp16_enabled() \
            and not ds_engine.bfloat16_enabled()  # (bf16's unfused optimizer keeps it)
        self._norm: Optional[torch.Tensor] = None  # a device tensor: read (a host sync) on log steps only
        # The config's share of each param group, as built; a checkpoint's load puts the saved values back.
        self._config_groups = [{k: g[k] for k in CONFIG_GROUP_KEYS if k in g} for g in ds_engine.optimizer.param_groups]

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def dtype(self) -> torch.dtype:
        if self.ds.bfloat16_enabled():
            return torch.bfloat16
        if self.ds.fp16_enabled():
            return torch.float16
        return torch.float32

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        if self._measure_norm and self.ds.is_gradient_accumulation_boundary():
            grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
            self._norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                               for g in grads])) if grads else None
        self.ds.step()

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def grad_norm(self) -> Optional[float]:
        norm = self.ds.get_global_grad_norm()
        norm = self._norm if norm is None else norm
        return None if norm is None else float(norm.item() if torch.is_tensor(norm) else norm)

    def loss_scale(self) -> Optional[float]:
        if not self.ds.fp16_enabled():
            return None
        return float(self.ds.optimizer.cur_scale) if hasattr(self.ds.optimizer, "cur_scale") else None

    def close(self) -> None:
        """Release the engine (ZeRO hooks and buffers) so that another can be built in this process."""
        if hasattr(self.ds, "destroy"):
            self.ds.destroy()
        self.ds = None

    def save(self, save_dir: Path, tag: str, client_state: dict) -> None:
        """Every rank writes its shard; DeepSpeed's own `latest` is not written — we mark completeness.

        A write that fails inside DeepSpeed (disk full on this rank only) must not leave this rank's collectives
        out of step with the others', who would wait in DeepSpeed's barrier: the failed write is recorded, DeepSpeed
        goes on through its barriers, and the error is raised once save_checkpoint has returned on every rank."""
        with writes_recorded(self.ds, int(client_state.get("step", -1))) as failed:
            self.ds.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
        if failed:
            raise failed[0]

    def load(self, load_dir: Path, tag: str, load_optimizer: bool = True) -> dict:
        """Every rank loads its shard (or, from a universal checkpoint, slices its part of every tensor)."""
        ds_logger, level = _ds().utils.logger, _ds().utils.logger.level
        ds_logger.setLevel(logging.ERROR)  # its universal loader warns "MPU is not provided": we use no MP
        try:
            with deepspeed_file_loads():
                path, client_state = self.ds.load_checkpoint(str(load_dir), tag=tag,
                                                             load_optimizer_states=load_optimizer,
                                                             load_lr_scheduler_states=False)
        finally:
            ds_logger.setLevel(level)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")
        if self.ds.load_universal_checkpoint() and load_optimizer:  # DeepSpeed's ZeRO-3 loader: see universal.py
            restore_param_groups(self.ds.optimizer, Path(load_dir) / tag, _load_deepspeed_file)
        for group, ours in zip(self.ds.optimizer.param_groups, self._config_groups):
            group.update(ours)  # a resume with another optim.weight_decay/betas/... uses it (train/resume.py says so)
        return client_state or {}

    def full_state(self, moments: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Every parameter's whole fp32 value and (after the first step) AdamW moments, gathered on CPU:
        ``{name: {param, exp_avg, exp_avg_sq}}``. Collective under ZeRO-3 (call on every rank). For tests and
        debugging, not the hot path."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        optimizer = self.ds.optimizer
        if moments and hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 and bf16 link each parameter to its AdamW moments once, right after the *first* param
            # group's first step, when the other groups have no state yet (DeepSpeed 0.19): link them again now.
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()
        out = {}
        for name, p in self.ds.module.named_parameters():
            value = safe_get_full_fp32_param(p)
            if value is None:  # no ZeRO and no mixed precision: the parameter is the fp32 master
                state = optimizer.state.get(p, {})
                entry = {"param": p.detach()}
                if moments:
                    entry.update({k: state[k] for k in ("exp_avg", "exp_avg_sq") if k in state})
            else:
                entry = {"param": value}
                for key in ("exp_avg", "exp_avg_sq"):
                    moment = safe_get_full_optimizer_state(p, key) if moments and p.requires_grad else None
                    if moment is not None:
                        entry[key] = moment
            out[name] = {k: v.detach().float().cpu().clone() for k, v in entry.items()}
        return out


@dataclasses.dataclass
class Fragment:
    """This rank's part of one trainable parameter's fp32 master: elements [start, start + value.numel()) of the
    flattened parameter (``numel`` elements in all). ``value`` may be DeepSpeed's own storage: read, never write."""
    name: str
    start: int
    value: torch.Tensor
    numel: int


def fp32_fragments(engine: Engine) -> tuple[list[Fragment], bool]:
    """``(fragments, replicated)``: the parts of the fp32 master weights this rank holds, with no communication.
    ZeRO-3: each parameter's partition (rank r holds [r x part, (r + 1) x part)); ZeRO-1/2 and DeepSpeed's bf16
    optimizer: the fragments of the flat fp32 partition (a parameter may be split between ranks or absent here);
    otherwise (ZeRO-0) the parameters, or in bf16 their fp32 masters, whole on every rank (``replicated``)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out, partitioned, masters = [], False, unfused_masters(engine.ds.optimizer)  # ZeRO-0 bf16: beside the params
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        numel = int(getattr(p, "ds_numel", p.numel()))
        if hasattr(p, "ds_id"):
            partitioned, part = True, p.ds_tensor.ds_numel
            local = _ds().utils.safe_get_local_fp32_param(p).view(-1)
            out.append(Fragment(name, rank * part, local[:max(0, min(part, numel - rank * part))], numel))
        elif hasattr(p, "_hp_mapping"):
            partitioned = True
            if p._hp_mapping is not None:
                out.append(Fragment(name, p._hp_mapping.lp_fragment_address.start,
                                    p._hp_mapping.get_hp_fragment().view(-1), numel))
        else:
            out.append(Fragment(name, 0, masters.get(id(p), p).detach().view(-1), numel))
    return out, not partitioned


def initialize(model: torch.nn.Module, param_groups: Iterable[dict], cfg: Config, ds_config: dict) -> Engine:
    """Wrap `model` with ZeRO. The client optimizer is torch's AdamW (fused on GPU: no JIT build, which failed
    for FusedAdam on H100's "9.0a" arch string), or, when optimizer states live on the CPU, DeepSpeed's
    vectorised CPU AdamW (built once by JIT and cached; torch's AdamW on CPU tensors would be far slower)."""
    groups = list(param_groups)
    if cfg.optim.name != "adamw":  # sgd, lars: vitscale/optim/optimizers.py
        optimizer = build_optimizer(groups, cfg)
    elif cfg.engine.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=0.0, betas=tuple(cfg.optim.betas),
                                     weight_decay=cfg.optim.weight_decay, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas),
                                      weight_decay=cfg.optim.weight_decay,
                                      **({"fused": True} if torch.cuda.is_available() else {}))
    if cfg.engine.zero_stage == 3:
        _gather_per_block(model)
    ds_engine, _, _, _ = _ds().initialize(model=model, optimizer=optimizer, config=ds_config)
    if unfused_masters(ds_engine.optimizer):
        # DeepSpeed's unfused mixed-precision optimizer (ZeRO-0 in bf16) steps once with zero gradients when built,
        # to create its state: AdamW's step count then started at 1 and the first real steps were damped (0.74x at
        # step 1, the gap to ZeRO 1-3 fading over ~20 steps). Cleared: the first step is AdamW's first.
        ds_engine.optimizer.optimizer.state.clear()
    if cfg.train.compile:
        _compile_blocks(ds_engine)
    return Engine(ds_engine)


def _gather_per_block(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers and releases parameters in hooks on every submodule (18 per ViT block, 6 of them holding
    parameters: 2 norms, qkv, proj, fc1, fc2). Marking each transformer block a ZeRO-3 "leaf" hooks the block
    alone and gathers it at once: a sixth of the all-gathers, each 6x larger, and the compiled block
    (train.compile) is one graph with no hook inside. The cost: one block's parameters live at once (ViT-L:
    12.6M, 25 MB in bf16), which the prefetch bucket holds anyway."""
    from deepspeed.utils import set_z3_leaf_module

    for blk in transformer_blocks(model):
        set_z3_leaf_module(blk, True)


def _compile_blocks(ds_engine: Any) -> None:
    """train.compile: each transformer block's forward compiled in place (vitscale.distributed.compile); ZeRO-3's
    per-block hooks run eagerly around it. A compiler failure: one warning (rank 0), then eager."""
    _ds().utils.nvtx.enable_nvtx = False  # as DeepSpeed's own engine.compile(): NVTX ranges break graphs
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    warn = (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True)) if rank0 else (lambda m: None)
    compile_blocks(ds_engine.module, ds_engine.device, warn=warn)


def consolidated_state_dict(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a whole model from a (possibly sharded) DeepSpeed checkpoint directory, on CPU. ZeRO 1-3:
    the fp32 masters are sharded over the optimizer files (a bf16 run's are named ``bf16_zero_pp_rank_*``)."""
    ckpt_path = Path(ckpt_path)
    if any(ckpt_path.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with _quiet_stdout(), deepspeed_file_loads():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_path.parent), tag=ckpt_path.name)
    else:  # ZeRO-0: the full module is in the rank-0 model file (and a bf16 run's fp32 masters beside it)
        files = sorted(ckpt_path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"no DeepSpeed model states in {ckpt_path}")
        states = _load_deepspeed_file(files[0])
        sd = masters_by_name(states["module"], states.get("optimizer")) or states["module"]
    return {k: v.float().contiguous() for k, v in sd.items()}


def to_universal(ckpt_path: Path, out_dir: Path, workers: int = 1) -> None:
    """Rewrite a ZeRO-1/2/3 checkpoint into DeepSpeed's universal layout (one file per parameter and state),
    readable by every ZeRO stage 1-3 at any world size, with DeepSpeed's converter; on one rank only. One worker
    converts serially here and forks nothing; more fork a pool, and a fork of a process whose torch thread pools
    have run can hang (:mod:`.child`), so they convert in a fresh Python process. Errors come as one line."""
    if workers <= 1:
        _convert_here(str(ckpt_path), str(out_dir), "1")
    else:
        run_in_fresh_python(f"{__name__}:_convert_here", str(ckpt_path), str(out_dir), str(workers))


def _convert_here(ckpt_path: str, out_dir: str, workers: str) -> None:
    """:func:`to_universal`'s work, in the process that calls it, with ``workers`` extracting processes (1: none,
    and nothing is forked)."""
    from deepspeed.checkpoint import ds_to_universal

    extract = int(workers)
    args = argparse.Namespace(input_folder=ckpt_path, output_folder=out_dir, num_extract_workers=extract,
                              num_merge_workers=max(1, extract // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with _quiet_stdout(), contextlib.redirect_stderr(io.StringIO()), deepspeed_file_loads():
        ds_to_universal.main(args)  # its worker processes are forked inside the safe-loading block: they inherit it
    make_stage_independent(Path(out_dir), _load_deepspeed_file)  # readable by ZeRO-1, 2 and 3, not one family
    # The converter also points a `latest_universal` file in out_dir's parent at out_dir; we resume by explicit
    # path, so drop it rather than leave a second, differently named "latest" next to the checkpoint.
    (Path(out_dir).parent / "latest_universal").unlink(missing_ok=True)


def _deepspeed_file_types() -> list[type]:
    """The classes DeepSpeed (0.19) pickles into its checkpoint files besides tensors and plain containers, found
    by listing the globals of ZeRO-0/1/2/3 checkpoints in fp32 and bf16 (and the fp16 scaler by reading its
    save code): ZeRO optimizer states hold the loss scaler object, the stage enum and, for ZeRO-1/2, fragment
    addresses. None of them runs code when built (no __setstate__/__reduce__ of their own)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_deepspeed_file(path: Path) -> Any:
    return safe_load(path, allowed=_deepspeed_file_types())


def deepspeed_file_loads():
    """Every file DeepSpeed reads inside this block (it passes torch.load weights_only=False) is read weights-only,
    allowing only the DeepSpeed classes its files hold; a file needing anything else is refused with one line
    naming it (:class:`vitscale.errors.CheckpointReadError`), before any of it runs."""
    return weights_only_loads(_deepspeed_file_types())


def _quiet_stdout():
    """DeepSpeed prints a line per process at init and zero_to_fp32 one per parameter group: keep the CLI readable."""
    return contextlib.redirect_stdout(io.StringIO())
