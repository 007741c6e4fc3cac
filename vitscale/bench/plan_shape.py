"""The model as ``vitscale plan`` sees it (:func:`model_shape`: dimensions, parameter counts, the stacks of blocks
and what ``model.freeze`` leaves training) and the activations a micro-batch saves for backward
(:func:`activation_bytes`); the formulas are described in :mod:`vitscale.bench.plan`'s docstring."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from vitscale.config.schema import Config
from vitscale.distributed.ds_config import build_ds_config
from vitscale.distributed.zero_tuning import ModelSizes
from vitscale.models.freeze import freeze, records_graph
from vitscale.models.layers import checkpoint_count
from vitscale.objectives import build_model, objective_for  # the one model factory: same model as training
from vitscale.optim import param_groups

STAGE3_DEFAULTS = {"stage3_prefetch_bucket_size": int(5e7), "stage3_param_persistence_threshold": int(1e5),
                   "sub_group_size": int(1e12)}
DEFAULT_BUCKET = int(5e8)  # DeepSpeed's reduce_bucket_size default (engine.build_ds_config caps it at the model size)


@dataclass
class Stack:
    """``depth`` identical pre-norm transformer blocks over ``tokens`` tokens."""
    name: str
    depth: int
    tokens: int
    dim: int
    mlp: int
    heads: int
    block_params: int
    # Leading blocks autograd records nothing for (model.freeze: no parameter at or below them trains), so they
    # save no activations: a linear probe's frozen encoder keeps none (vitscale.models.freeze.records_graph).
    frozen: int = 0
    qk_norm: bool = False  # model.qk_norm: LayerNorm on each head's queries and keys
    layer_scale: bool = False  # model.init_values: LayerScale on both residual branches

    @property
    def live(self) -> int:
        return self.depth - self.frozen


@dataclass
class ModelShape:
    name: str
    objective: str  # objective.name: what the step computes around the blocks
    params: int  # every parameter (frozen ones included: they are cast and stored too)
    trainable: int  # parameters with gradients and optimizer state
    small_params: int  # parameters in tensors below ZeRO-3's persistence threshold
    stacks: list[Stack]
    img_size: int
    in_chans: int
    num_classes: int  # of the head (0: the objective trains no classifier)
    # Activation bytes one image keeps outside the blocks (the objective's loss, norms, head), by bytes per
    # element of the compute dtype (2 or 4): Objective.outside_blocks_bytes, which is linear in the batch.
    outside_bytes: dict[int, int] = field(default_factory=dict)
    hybrid: bool = False
    sizes: Optional[ModelSizes] = None  # what ZeRO-3's settings are sized from
    # Trainable parameters of the largest optimizer parameter group (optim.param_groups): DeepSpeed steps and makes
    # step-time copies one group at a time. 0: unknown, taken as ``trainable``.
    largest_group: int = 0

    @property
    def step_group(self) -> int:
        return self.largest_group or self.trainable


def stage3_settings(cfg: Config, sizes: ModelSizes, world: int = 1) -> dict[str, int]:
    """The ZeRO-3 settings training would use for this model (sized from it, user overrides applied), whatever
    engine.zero_stage the config has: the plan prints a ZeRO-3 row either way."""
    cfg3 = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, zero_stage=3))
    zero = build_ds_config(cfg3, world, sizes=sizes)["zero_optimization"]
    return {k: int(zero.get(k, v)) for k, v in {**STAGE3_DEFAULTS, "reduce_bucket_size": DEFAULT_BUCKET}.items()}


def model_shape(cfg: Config, num_classes: int) -> ModelShape:
    """Dimensions and parameter counts of the configured model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(cfg, num_classes)
    freeze(model, cfg.model.freeze)  # as training does: frozen parameters have no gradients or optimizer states
    sizes = ModelSizes.of(model)
    threshold = stage3_settings(cfg, sizes)["stage3_param_persistence_threshold"]
    ps = list(model.parameters())
    common = dict(sizes=sizes, params=sum(p.numel() for p in ps),
                  trainable=sum(p.numel() for p in ps if p.requires_grad),
                  small_params=sum(p.numel() for p in ps if p.numel() < threshold), img_size=cfg.model.img_size)
    objective = objective_for(cfg)
    enc = objective.encoder(model)
    hybrid = hasattr(enc.patch_embed, "backbone")  # HybridEmbed: a ResNet stem before the projection

    def stack(name, blocks, tokens):
        blk = blocks[0]
        return Stack(name, len(blocks), tokens, blk.norm1.normalized_shape[0], blk.mlp.fc1.out_features,
                     blk.attn.num_heads, sum(p.numel() for p in blk.parameters()),
                     frozen=sum(not records_graph(model, b) for b in blocks),
                     qk_norm=not isinstance(getattr(blk.attn, "q_norm", nn.Identity()), nn.Identity),
                     layer_scale=not isinstance(getattr(blk, "ls1", nn.Identity()), nn.Identity))

    stacks = [stack(*spec) for spec in objective.block_stacks(model)]
    outside = {b: objective.outside_blocks_bytes(model, stacks, 1, b) for b in (2, 4)}
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)  # as training groups them
    largest = max((sum(p.numel() for p in g["params"]) for g in groups), default=0)
    return ModelShape(cfg.model.name, cfg.objective.name, stacks=stacks, in_chans=enc.in_chans,
                      num_classes=getattr(model, "num_classes", 0), outside_bytes=outside, hybrid=hybrid,
                      largest_group=largest, **common)


# ----- activations ---------------------------------------------------------------------------------------------
def block_activation_bytes(batch: int, st: Stack, b: int) -> int:
    """Bytes one block saves for backward (see the module docstring), qk_norm and LayerScale included."""
    per_token = (8 * st.dim + 2 * st.mlp) * b + (4 + st.heads) * 4
    if st.qk_norm:  # normalised q and k, the projection's input copied, fp32 mean and rstd of 2 norms a head
        per_token += 3 * st.dim * b + 4 * st.heads * 4
    if st.layer_scale:  # the inputs of both gamma multiplies: the attention and MLP branch outputs
        per_token += 2 * st.dim * b
    return batch * st.tokens * per_token


def checkpointed_blocks(shape: ModelShape, grad_ckpt: Union[bool, int]) -> list[int]:
    """Blocks recomputed per stack for ``model.grad_checkpointing`` (the first N in forward order, as the models
    do: :func:`vitscale.models.layers.checkpoint_count`)."""
    left = checkpoint_count(grad_ckpt, sum(st.depth for st in shape.stacks))
    out = []
    for st in shape.stacks:
        out.append(min(left, st.depth))
        left -= out[-1]
    return out


def activation_bytes(shape: ModelShape, batch: int, b: int, grad_ckpt: Union[bool, int]) -> dict[str, int]:
    """Saved-activation bytes of one micro-batch: ``blocks``, ``other`` (outside the blocks), ``transient``.

    ``grad_ckpt``: True (every block), False, or N (the first N blocks in forward order) recomputed. A recomputed
    block keeps only its input (B*N*D*b). Backward runs the un-checkpointed (later) blocks first and frees their
    activations, then recomputes the checkpointed ones one at a time, so the peak is the larger of what is saved
    when backward starts and the checkpointed inputs plus one recomputed block (whose input is among its own
    activations); the estimate never grows with N (checkpointing the last block saves nothing)."""
    B, S = batch, shape.img_size
    # Frozen leading blocks (Stack.frozen) save nothing, checkpointed or not; they are among the first N.
    ckpt = [max(n - st.frozen, 0) for st, n in zip(shape.stacks, checkpointed_blocks(shape, grad_ckpt))]
    whole = [st.depth - st.frozen - n for st, n in zip(shape.stacks, ckpt)]  # saved in full
    inputs = [B * st.tokens * st.dim * b for st in shape.stacks]
    full = [block_activation_bytes(B, st, b) for st in shape.stacks]
    saved = sum(n * i + w * f for n, w, i, f in zip(ckpt, whole, inputs, full))
    recompute = sum(n * i for n, i in zip(ckpt, inputs)) + max(
        [f - i for n, i, f in zip(ckpt, inputs, full) if n > 0], default=0)
    blocks = max(saved, recompute)
    other = B * shape.in_chans * S * S * (1 + b)  # uint8 batch on the device + the images in compute dtype
    other += B * shape.outside_bytes[b]  # the objective's: loss, final norms, head
    transient = max((B * st.tokens * st.mlp * b for st in shape.stacks if st.live), default=0)
    return {"blocks": int(blocks), "other": int(other), "transient": int(transient)}
