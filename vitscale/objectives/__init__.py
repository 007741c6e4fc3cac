"""Objectives: each owns what differs between MAE and supervised training (model, FLOPs, loss and metrics,
held-out evaluation, pictures); see :mod:`vitscale.objectives.base`. They know models, not engines or ranks.

    objective = objective_for(cfg)
    model = objective.build_model(num_classes)       # or build_model(cfg, num_classes)
    loss, metrics = objective(model, images, labels)
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from vitscale.config.schema import Config, ModelConfig
from vitscale.objectives.base import MODEL_KWARGS, Objective, Picture, model_kwargs
from vitscale.objectives.mae import MAE
from vitscale.objectives.supervised import Supervised

OBJECTIVES: dict[str, type[Objective]] = {"supervised": Supervised, "mae": MAE}


def objective_for(cfg: Config) -> Objective:
    """The objective named by ``objective.name``, configured by ``cfg``."""
    return OBJECTIVES[cfg.objective.name](cfg)


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The one model factory (train, bench, plan, eval and analyze): the configured objective's model."""
    return objective_for(cfg).build_model(num_classes)


# Training-only settings: a model rebuilt from a saved config (for evaluation or analysis) has them off.
TRAINING_ONLY = {"drop_path": 0.0, "drop_rate": 0.0, "attn_drop_rate": 0.0, "proj_drop_rate": 0.0,
                 "grad_checkpointing": False}


def build_saved_model(model_cfg: dict[str, Any], objective: str = "supervised", num_classes: int = 0,
                      norm_pix_loss: bool = True) -> nn.Module:
    """:func:`build_model` for a saved ``model`` config section (a checkpoint's trainer_state.json, an exported
    file's metadata). Keys this version does not know are ignored, missing ones take their defaults, and the
    training-only regularisers are off (:data:`TRAINING_ONLY`)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in model_cfg.items() if k in known})
    cfg = Config(model=dataclasses.replace(model, **TRAINING_ONLY))
    cfg.objective.name, cfg.objective.norm_pix_loss = objective, norm_pix_loss
    return build_model(cfg, num_classes)


__all__ = ["MODEL_KWARGS", "OBJECTIVES", "Objective", "Picture", "build_model", "build_saved_model", "model_kwargs",
           "objective_for"]
