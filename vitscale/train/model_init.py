"""The trainer's side of fine-tuning and linear probing: where a fresh run's weights come from (``model.init``),
how a fresh head starts (``model.head_init_std``) and what does not train (``model.freeze``).

Two calls from the loop: :func:`plan` before the run directory is touched (a source that does not fit is a
one-line error and nothing is written), :func:`prepare` right after the model is built and before the engine
wraps it (so ZeRO's fp32 masters and the optimizer groups see the loaded, frozen model).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from vitscale.config.schema import Config
from vitscale.distributed import engine as eng
from vitscale.models.freeze import freeze  # one implementation, shared with the planner
from vitscale.weights.fit import encoder_of
from vitscale.weights.init import InitPlan, plan_init



def plan(cfg: Config, build_model: Callable[[], nn.Module], resuming: bool,
         log: Callable[[str], None] = print) -> Optional[InitPlan]:
    """The fitted ``model.init`` source, or None (no init, or a resumed run: its checkpoint wins). Also checks
    ``model.freeze`` on the meta-device model, so a bad value fails before anything is written."""
    if cfg.model.freeze:
        with torch.device("meta"):
            freeze(build_model(), cfg.model.freeze)
    if not cfg.model.init:
        return None
    if resuming:
        log(f"model.init={cfg.model.init} ignored: resuming from this run's checkpoint")
        return None
    return plan_init(cfg.model.init, build_model)


def prepare(model: nn.Module, cfg: Config, init: Optional[InitPlan], log: Callable[[str], None] = print) -> None:
    """Load ``init`` (once), start a fresh head as configured, freeze what ``model.freeze`` names. Collective
    under ZeRO-3 (every rank calls it with the same arguments)."""
    if init is not None:
        init.apply(model, log)
    if cfg.model.head_init_std is not None and not (init is not None and init.loads("head.weight")):
        init_head(model, cfg.model.head_init_std, cfg.run.seed)
    freeze(model, cfg.model.freeze)


@torch.no_grad()
def init_head(model: nn.Module, std: float, seed: int) -> None:
    """Truncated-normal head weights with ``std`` and zero bias (MAE: 2e-5 fine-tuning, 0.01 linear probing),
    drawn from a generator seeded by ``seed``: the same head on every rank and every launch."""
    head = getattr(encoder_of(model), "head", None)
    if not isinstance(head, nn.Linear):
        return
    shape = tuple(getattr(head.weight, "ds_shape", head.weight.shape))
    weight = torch.zeros(shape)  # std 0: the ViT paper's zero-initialised head
    if std > 0:
        nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std, generator=torch.Generator().manual_seed(seed))
    with eng.gathered_params([head.weight, head.bias]):
        head.weight.data.copy_(weight.to(head.weight.device, head.weight.dtype))
        head.bias.data.zero_()
