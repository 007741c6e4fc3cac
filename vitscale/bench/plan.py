"""``vitscale plan``: GPU memory per rank for every ZeRO stage and offload choice, analytically.

Model states (bytes per parameter; P = parameters, N = data-parallel ranks = gpus x nodes). Mixed precision
(bf16/fp16) follows the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3.1): 2 (16-bit params) + 2
(16-bit grads) + 12 (fp32 master copy, Adam momentum, Adam variance) = 16 bytes/param. Stage 1 divides the 12 by
N, stage 2 also the grads, stage 3 also the params. fp32 training has no 16-bit copy: 4 (params) + 4 (grads) + 8
(two moments), plus 4 more from stage 1 on because DeepSpeed's ZeRO optimizer keeps its own fp32 partition
copy even when the model is fp32 (measured: 16.0 bytes/param at rest under ZeRO-1/2 fp32 vs 12.0 under ZeRO-0).
``offload_optimizer`` moves the optimizer term (+ a 4-byte fp32 gradient copy) to host memory; ``offload_params``
(ZeRO-3) moves the parameters there too.

DeepSpeed buffers on top (read from the generated DeepSpeed config): ZeRO-1/2 allocate a gradient bucket of
``reduce_bucket_size`` elements in the model dtype at the first backward, whatever the model's size — two when
``overlap_comm`` is on (our GPU default): 2 x 5e8 x 2 bytes = 1.86 GB for bf16. ZeRO-3 has one such bucket plus
a working set of gathered parameters (the prefetch bucket plus the two largest blocks) and keeps parameters
below ``stage3_param_persistence_threshold`` elements whole on every rank.

Activations (what autograd saves for backward, per micro-batch; b = bytes per element of the compute dtype): per
transformer block with N tokens, width D, MLP width M and h heads, B * N * ((8D + 2M) * b + (4 + h) * 4): block
input, LN1 output, qkv (3D), attention output (flash/SDPA keeps no N x N matrix; the projection input is a view of
it), residual, LN2 output, fc1 output (M) and GELU output (M), plus fp32 LayerNorm statistics and the attention
log-sum-exp. ``model.qk_norm`` adds 3D * b + 4h * 4 (the normalised queries and keys, a copy of the attention output
as the projection's input, no longer a view of it, and the norms' fp32 mean and rstd), LayerScale
(``model.init_values``) 2D * b (the two branch outputs its gammas multiply): measured with saved-tensor hooks on one
block (tests/test_plan_saved.py). Around the blocks: the uint8 batch and its cast copy, the final norm's input and
output, logits (supervised) or, for MAE, the encoder's and decoder's final norms, the fp32 target and error of the
loss and the index tensors of the masking. With gradient checkpointing each block keeps only its input (B*N*D*b) and
one block is recomputed at a time; ``model.grad_checkpointing=N`` recomputes only the first N blocks (see
:func:`activation_bytes`). A backward transient of B*N*M*b (the largest MLP gradient) is added. The encoder of an
MAE sees floor(L * (1 - mask_ratio)) + 1 tokens (:func:`vitscale.models.mae.tokens_kept`), its decoder L + 1.
``model.freeze`` applies as in training (:func:`vitscale.models.freeze.freeze`): frozen parameters have no gradients
or optimizer states, and blocks with no trainable parameter at or below them save nothing (autograd records no graph
there), so a linear probe's frozen encoder keeps no block activations.

Peak = max(backward: model states + buckets + activations + transient, optimizer step: model states + buckets
+ the fp32 copy of the gradient partition ZeRO-1/2 make in mixed precision, one parameter group at a time).

``--device cpu`` plans the CPU processes of a rehearsal (``vitscale preflight``, ``deepspeed --num_gpus N`` with
DeepSpeed's CPU accelerator) instead of GPUs: the figure is a process's resident memory, so it adds the runtime
every process carries before any tensor (Python, torch, DeepSpeed, gloo: :data:`CPU_RUNTIME_BYTES`, measured), and
the optimizer step's temporaries of torch's AdamW on CPU, which is not fused: two temporaries (the second moment's
sqrt, then divided by its bias correction) the size of the flat partition it steps, plus a flat fp32 copy of that
partition's gradients under ZeRO-3 (ZeRO-1/2 step the fp32 gradient partition in place; in bf16 its fp32 copy is
the step-time term above). DeepSpeed steps one optimizer parameter group at a time, so the partition is the largest
group's share (``ModelShape.largest_group`` / N): nearly the whole model for MAE pretraining, one block with
``optim.layer_decay`` (a group per block), and at most one ``sub_group_size`` under ZeRO-3. Measured per process
on 2 CPU processes in docs/benchmarks.md. It fits if peak + ``reserve_gb``
(CUDA context, NCCL/cuBLAS workspaces, allocator fragmentation) <= the GPU's memory. Checked on CPU against the
live tensor bytes of a real engine step (``vitscale plan --measure``, :mod:`vitscale.bench.memory`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from vitscale.bench.common import GB, resolve_num_classes
from vitscale.bench.plan_shape import (DEFAULT_BUCKET, STAGE3_DEFAULTS, ModelShape, Stack, activation_bytes,
                                       block_activation_bytes, checkpointed_blocks, model_shape, stage3_settings)
from vitscale.config.resolve import resolve
from vitscale.config.schema import Config
from vitscale.distributed.ds_config import build_ds_config

__all__ = ["CPU_RUNTIME_BYTES", "DEFAULT_BUCKET", "OPTIONS", "STAGE3_DEFAULTS", "ModelShape", "Option", "Plan", "Row",
           "Stack", "activation_bytes", "block_activation_bytes", "checkpointed_blocks", "cpu_step_bytes",
           "model_shape", "model_state_bytes", "plan_memory", "stage3_settings"]

# Resident memory of a training process besides its model: Python, torch, DeepSpeed, gloo, the data pipeline
# (measured: 0.53 GB after engine setup; 0.89 GB peak for a whole `vitscale train` of a 0.1M-parameter ViT in each
# of 2 `deepspeed --num_gpus 2` CPU processes, data decoded in-process).
CPU_RUNTIME_BYTES = int(0.88 * 2 ** 30)


# ----- model states --------------------------------------------------------------------------------------------
@dataclass
class Option:
    """One row of the plan: a ZeRO stage and offload choice."""
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def label(self) -> str:
        off = "+offload opt+params" if self.offload_params else "+offload opt" if self.offload_optimizer else ""
        return f"ZeRO-{self.stage}{off}"


OPTIONS = [Option(0), Option(1), Option(1, True), Option(2), Option(2, True), Option(3), Option(3, True),
           Option(3, True, True)]


@dataclass
class Row:
    option: str
    stage: int
    offload_optimizer: bool
    offload_params: bool
    params: int
    grads: int
    optimizer: int
    buffers: int
    step_extra: int  # fp32 gradient partition that exists only during the optimizer step
    activations: int
    activations_ckpt: int
    total: int
    total_ckpt: int
    fits: bool
    fits_ckpt: bool
    cpu_per_node: int  # host memory for offloaded states on one node
    current: bool = False


@dataclass
class Plan:
    model: str
    params: int
    trainable: int
    world_size: int
    gpus_per_node: int
    batch: int
    img_size: int
    precision: str
    gpu_mem_gb: float
    reserve_gb: float
    bucket_elems: int
    overlap_comm: bool
    activation_detail: dict[str, dict[str, int]]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ckpt_blocks: int = 0  # blocks recomputed in the "+ckpt" columns (model.grad_checkpointing, or all)
    device: str = "gpu"  # "cpu": the figures are CPU processes' resident memory (a rehearsal)
    blocks: int = 0  # transformer blocks in the model

    def row(self, stage: int, offload_optimizer: bool = False, offload_params: bool = False) -> Row:
        for r in self.rows:
            if (r.stage, r.offload_optimizer, r.offload_params) == (stage, offload_optimizer, offload_params):
                return r
        raise KeyError((stage, offload_optimizer, offload_params))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ds_zero(cfg: Config, overlap_comm: Optional[bool], shape: ModelShape, world: int = 1
             ) -> tuple[int, bool, dict]:
    """ZeRO-1/2 bucket size, overlap and the ZeRO-3 settings from the DeepSpeed config the trainer generates
    (user overrides included)."""
    zero = dict(build_ds_config(cfg, world, num_params=shape.params, sizes=shape.sizes).get("zero_optimization", {}))
    user = cfg.engine.ds_config.get("zero_optimization", {}) if isinstance(cfg.engine.ds_config, dict) else {}
    bucket = int(zero.get("reduce_bucket_size", DEFAULT_BUCKET))
    if overlap_comm is None:  # plan for a GPU machine: build_ds_config turns overlap on there
        overlap_comm = bool(user.get("overlap_comm", True))
    stage3 = stage3_settings(cfg, shape.sizes, world) if shape.sizes is not None else {**STAGE3_DEFAULTS,
                                                                               "reduce_bucket_size": bucket}
    return bucket, overlap_comm, stage3


def cpu_step_bytes(shape: ModelShape, opt: Option, world: int, stage3: Optional[dict] = None,
                   mixed: bool = False) -> int:
    """The optimizer step's temporaries on a CPU process (see the module docstring), for the largest partition
    stepped at once: two AdamW temporaries of its size (8 bytes an element) plus, under ZeRO-3, a flat fp32 copy of
    its gradients (4). fp32 ZeRO-1/2 step their fp32 gradient partition in place; in bf16 they convert it to an
    fp32 copy and free the bf16 one first (+4 - 2). Measured with ``plan --measure`` within 3% (ViT-S, 1 process)."""
    if opt.stage == 0 or opt.offload_optimizer:
        return 0  # stage 0: each parameter stepped alone (one tensor's temporaries); offload: in-place CPU Adam
    chunk = shape.step_group / world
    if opt.stage == 3:
        chunk = min(chunk, (stage3 or STAGE3_DEFAULTS).get("sub_group_size", STAGE3_DEFAULTS["sub_group_size"]))
        return int(chunk * 12)
    return int(chunk * (10 if mixed else 8))


def model_state_bytes(shape: ModelShape, opt: Option, precision: str, world: int, bucket: int,
                      overlap_comm: bool, stage3: Optional[dict] = None, ema: bool = False) -> dict[str, int]:
    """Per-rank bytes of params, grads, optimizer states and DeepSpeed buffers for one option. ``ema``
    (train.ema_decay > 0): the model EMA, fp32 beside each rank's fp32 master part (4 bytes per trained parameter,
    divided by the ranks from ZeRO-1 on), is counted with the optimizer states."""
    mixed = precision in ("bf16", "fp16")
    pb = 2 if mixed else 4
    P, T, N = shape.params, shape.trainable, world
    optim_pp = 12 if mixed else 8 + (4 if opt.stage >= 1 else 0)
    params = P * pb / N if opt.stage == 3 else P * pb
    grads = T * pb / N if opt.stage >= 2 else T * pb
    optim = (T * optim_pp + (4 * T if ema else 0)) / (N if opt.stage >= 1 else 1)
    cpu = 0.0
    if opt.offload_optimizer:
        cpu += optim + 4 * T / N  # states + DeepSpeed's fp32 gradient copy live in host memory
        optim = 0
    buffers = 0.0
    if opt.stage in (1, 2):
        buffers = bucket * pb * (2 if overlap_comm else 1)
    elif opt.stage == 3:
        s3 = stage3 or STAGE3_DEFAULTS
        biggest = sorted((st.block_params for st in shape.stacks), reverse=True)
        working = min(P, s3["stage3_prefetch_bucket_size"] + 2 * biggest[0])
        buffers = s3.get("reduce_bucket_size", bucket) * pb + (working + shape.small_params) * pb
        if opt.offload_params:
            cpu += params
            params = 0
    # ZeRO-1/2 in mixed precision: the fp32 copy of one parameter group's gradient partition while it is stepped
    step_extra = 4 * shape.step_group / N if (mixed and opt.stage in (1, 2) and not opt.offload_optimizer) else 0
    return {k: int(v) for k, v in dict(params=params, grads=grads, optimizer=optim, buffers=buffers,
                                         step_extra=step_extra, cpu=cpu).items()}


def plan_memory(cfg: Config, gpus: int = 1, nodes: int = 1, gpu_mem_gb: float = 80.0, reserve_gb: float = 4.0,
                num_classes: Optional[int] = None, overlap_comm: Optional[bool] = None,
                shape: Optional[ModelShape] = None, device: str = "gpu") -> Plan:
    """Memory per GPU of the configured model for every option in :data:`OPTIONS`.

    ``gpus`` is GPUs per node (like ``deepspeed --num_gpus``), so the data-parallel world is gpus x nodes.
    ``overlap_comm=None`` plans for a GPU machine (two gradient buckets); pass False for what a CPU run does.
    ``device="cpu"``: ``gpus`` CPU processes of a rehearsal instead (resident memory a process: the runtime and
    the CPU optimizer step's temporaries included, no gradient-bucket overlap)."""
    if gpus < 1 or nodes < 1:
        raise ValueError(f"--gpus and --nodes must be >= 1, got gpus={gpus}, nodes={nodes}")
    if gpu_mem_gb <= 0 or reserve_gb < 0:
        raise ValueError(f"--gpu-mem must be > 0 and --reserve-gb >= 0, got {gpu_mem_gb} and {reserve_gb}")
    if reserve_gb >= gpu_mem_gb:
        raise ValueError(f"--reserve-gb {reserve_gb:g} must be less than --gpu-mem {gpu_mem_gb:g}: it would leave "
                         f"nothing of the GPU for the run")
    classes, source = resolve_num_classes(cfg, num_classes)
    shape = shape or model_shape(cfg, classes)
    world = gpus * nodes
    cfg = resolve(cfg, world, need_length=False).cfg  # data.global_batch_size -> the per-GPU batch at this world size
    b = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    batch = cfg.data.batch_size
    act = activation_bytes(shape, batch, b, grad_ckpt=False)
    # The "+ckpt" columns: the configured number of blocks when model.grad_checkpointing is a number, else all.
    setting = cfg.model.grad_checkpointing
    ckpt_setting = setting if not isinstance(setting, bool) else True
    act_ckpt = activation_bytes(shape, batch, b, grad_ckpt=ckpt_setting)
    cpu = device == "cpu"
    if device not in ("cpu", "gpu"):
        raise ValueError(f"--device must be cpu or gpu, got {device!r}")
    bucket, overlap, stage3 = _ds_zero(cfg, False if cpu else overlap_comm, shape, world)
    plan = Plan(shape.name, shape.params, shape.trainable, world, gpus, batch, cfg.model.img_size,
                cfg.train.precision, gpu_mem_gb, reserve_gb, bucket, overlap,
                {"no_ckpt": act, "ckpt": act_ckpt})
    plan.device = device
    plan.blocks = sum(st.depth for st in shape.stacks)
    plan.ckpt_blocks = sum(checkpointed_blocks(shape, ckpt_setting))
    if shape.num_classes:  # a classifier head
        fixed = shape.num_classes != classes  # the objective sets its own head (not the data's classes)
        plan.notes.append(f"classifier head: {shape.num_classes} classes ({'the objective' if fixed else source})")
    if shape.hybrid:
        plan.notes.append("hybrid ResNet stem: its activations are not modelled (the plan is low)")
    usable = (gpu_mem_gb - reserve_gb) * GB
    for opt in OPTIONS:
        s = model_state_bytes(shape, opt, cfg.train.precision, world, bucket, overlap, stage3,
                              ema=cfg.train.ema_decay > 0)
        if cpu:  # a process's resident memory: its runtime, and the unfused AdamW's temporaries at the step
            s["buffers"] += CPU_RUNTIME_BYTES
            mixed = cfg.train.precision in ("bf16", "fp16")
            s["step_extra"] = max(s["step_extra"], cpu_step_bytes(shape, opt, world, stage3, mixed))
        states = s["params"] + s["grads"] + s["optimizer"] + s["buffers"]
        a, ac = sum(act.values()), sum(act_ckpt.values())
        total = max(states + a, states + s["step_extra"])
        total_ckpt = max(states + ac, states + s["step_extra"])
        current = (opt.stage == cfg.engine.zero_stage and opt.offload_optimizer == cfg.engine.offload_optimizer
                   and opt.offload_params == cfg.engine.offload_params)
        plan.rows.append(Row(opt.label, opt.stage, opt.offload_optimizer, opt.offload_params, s["params"],
                             s["grads"], s["optimizer"], s["buffers"], s["step_extra"], a, ac, total, total_ckpt,
                             total <= usable, total_ckpt <= usable, s["cpu"] * gpus, current))
    return plan
