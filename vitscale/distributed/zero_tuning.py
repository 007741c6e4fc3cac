"""ZeRO-3 settings sized from the model instead of DeepSpeed's one-size defaults (reasoning: docs/benchmarks.md).

DeepSpeed's defaults are sized for billion-parameter language models: prefetch 5e7 elements, keep parameters
below 1e5 elements whole, up to 1e9 parameters live, 5e8-element gradient buckets. A ViT is a stack of identical
blocks of 12 H^2 parameters (H = width; ViT-L: 12.6M), so every size here is counted in blocks:

- ``stage3_prefetch_bucket_size`` = 2 blocks: while block k computes, blocks k+1 and k+2 are being gathered. One
  ViT-L block's forward at batch 128 is ~1.9 TFLOP (ms on an H100), its all-gather 25 MB (tens of microseconds
  over NVLink): two blocks ahead hide the latency; more only holds memory.
- ``stage3_param_persistence_threshold`` = 8 H elements: every norm weight and bias (at most the MLP width, 4 H)
  stays whole on every rank, so it never costs a collective of its own, while every weight matrix (>= H^2) is
  sharded. DeepSpeed's 1e5 shards nothing at all below H = 316 (tiny test models) and is blind to the width.
- ``stage3_max_live_parameters`` = 4 blocks (the one computing, two prefetched, one being recomputed under
  gradient checkpointing) and ``stage3_max_reuse_distance`` the same: a parameter needed again within that
  distance is kept, not released and gathered again; beyond it, it is released, so memory stays a few blocks
  whatever the depth (the default 1e9 never releases anything of a ViT-L, i.e. no ZeRO-3 memory saving).
- ``reduce_bucket_size`` = ``allgather_bucket_size`` = 2 blocks of gradients: a reduce-scatter starts every two
  blocks of backward and overlaps with the rest (``overlap_comm`` on GPUs); 50 MB in bf16 for ViT-L is well past
  the message size where NCCL reaches its bandwidth, and is 6x less memory than a bucket of the whole model.
- ``sub_group_size`` = min(2 blocks, P / world) elements of each rank's partition: the optimizer step runs one
  sub-group at a time, and for each it makes a flat copy of the sub-group's gradients and AdamW makes two more
  temporaries of its size (sqrt and divide of the second moment). DeepSpeed's default (1e12: one sub-group) makes
  those three copies of the *whole* partition: measured 1.84 GB a rank above the at-rest 3.16 GB for MAE ViT-L/16
  fp32 on 2 processes. Capped at P / world because DeepSpeed allocates, once at start, an fp32 buffer of the
  sub-group's *unpartitioned* size (world x sub-group): never more than one model, as with its default.
ZeRO-3 also gathers each block as one unit (``engine._gather_per_block``): one hooked module and one all-gather
per block instead of 18 and 6.
Every value can still be overridden through ``engine.ds_config.zero_optimization``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from vitscale.distributed.compile import transformer_blocks

MIN_BUCKET = int(1e6)  # below this, per-call overhead dominates any collective
MAX_BUCKET = int(5e8)  # DeepSpeed's default, the ceiling


@dataclass(frozen=True)
class ModelSizes:
    """What the ZeRO settings are sized from (a model built on the meta device gives them at no cost)."""
    params: int  # every parameter
    hidden: int  # the widest transformer block's width
    block_params: int  # the largest transformer block's parameter count

    @classmethod
    def of(cls, model: nn.Module) -> "ModelSizes":
        params = sum(p.numel() for p in model.parameters())
        blocks = transformer_blocks(model)
        if not blocks:  # not a transformer (e.g. a baseline CNN): size from the whole model
            return cls(params, 0, params)
        hidden = max(_width(b) for b in blocks)
        return cls(params, int(hidden), max(sum(p.numel() for p in b.parameters()) for b in blocks))


def _width(block: nn.Module) -> int:
    """A block's width: its first norm's size (ours and timm's blocks), else the smallest matrix input."""
    norm = getattr(block, "norm1", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        return int(norm.weight.numel())
    return min((int(p.shape[-1]) for p in block.parameters() if p.dim() == 2), default=0)


BUCKET_ALIGN = 2  # DeepSpeed asserts a ZeRO-1/2 bucket is a multiple of 2 elements (4-byte NCCL alignment)


def bucket_elems(n: float) -> int:
    """A bucket of about ``n`` elements, rounded up to a multiple of BUCKET_ALIGN. A bucket sized from a model's
    parameter count is odd for an odd head (e.g. 5 classes): DeepSpeed's ZeRO-1/2 then stops at initialize with
    'allgather_bucket_size must be a multiple of nccl_start_alignment_factor' (seen on the first GPU run)."""
    return -(-int(n) // BUCKET_ALIGN) * BUCKET_ALIGN


def _clamp(n: float, params: int) -> int:
    return bucket_elems(min(MAX_BUCKET, max(MIN_BUCKET, min(n, max(params, MIN_BUCKET)))))


def gradient_bucket(sizes: ModelSizes) -> int:
    """Elements of a gradient reduce (and parameter all-gather) bucket, ZeRO 1-3: two blocks (see above). ZeRO-1/2
    allocate it whole, in the model dtype, at the first backward; a bucket of the whole model (DeepSpeed's 5e8
    capped at the model's size) was 1.2 GB a rank for ViT-L/16 in fp32."""
    return _clamp(2 * sizes.block_params, sizes.params)


def zero3_settings(sizes: ModelSizes, world_size: int = 1) -> dict[str, int]:
    """The ZeRO-3 keys of DeepSpeed's ``zero_optimization`` section for a model of these sizes."""
    block = sizes.block_params
    return {
        "sub_group_size": _clamp(min(2 * block, -(-sizes.params // max(world_size, 1))), sizes.params),
        "stage3_prefetch_bucket_size": _clamp(2 * block, sizes.params),
        "stage3_param_persistence_threshold": int(8 * sizes.hidden) if sizes.hidden else int(1e5),
        "stage3_max_live_parameters": _clamp(4 * block, sizes.params),
        "stage3_max_reuse_distance": _clamp(4 * block, sizes.params),
        "reduce_bucket_size": gradient_bucket(sizes),
        "allgather_bucket_size": gradient_bucket(sizes),
    }
