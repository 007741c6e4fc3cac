"""Objectives: each owns what differs between MAE and supervised training (config rules, model, FLOPs, loss and
metrics, held-out evaluation, pictures, export, rebuilding from weights, probes, planning); see :mod:`vitscale.objectives.base`. They know models, not engines or ranks.

    objective = objective_for(cfg)
    model = objective.build_model(num_classes)       # or build_model(cfg, num_classes)
    loss, metrics = objective(model, images, labels)
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Any, Optional

from torch import nn

from vitscale.config.schema import Config, ModelConfig
from vitscale.errors import ConfigError
from vitscale.objectives.base import MODEL_KWARGS, Objective, Picture, model_kwargs
from vitscale.objectives.mae import MAE
from vitscale.objectives.supervised import Supervised

# The built-in objectives by ``objective.name``. A new objective is one file: its class (an ``Objective`` subclass)
# is either added here, registered at run time (:func:`register`), or named by import path in the config
# (``objective.name: my_package.my_module:MyObjective``), which also reaches every process a launcher starts.
OBJECTIVES: dict[str, type[Objective]] = {"supervised": Supervised, "mae": MAE}
# What a weights file without vitscale metadata (a timm state dict) is trained for, unless an objective adopts it.
DEFAULT_OBJECTIVE = "supervised"


def register(cls: type[Objective]) -> type[Objective]:
    """Make ``cls`` available as ``objective.name: <cls.name>`` in this process (usable as a class decorator)."""
    OBJECTIVES[cls.name] = cls
    return cls


def objective_class(name: str) -> type[Objective]:
    """The class ``objective.name`` names: a registered name or ``package.module:Class`` (one-line ConfigError)."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"objective.name={name!r} cannot be imported ({e})") from None
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise ConfigError(f"objective.name={name!r} is not a vitscale.objectives.Objective subclass")
        return cls
    raise ConfigError(f"config key 'objective.name' got {name!r}, expected one of {', '.join(OBJECTIVES)} "
                      f"(or an import path package.module:Class)")


# Plugin objectives a file may name and vitscale may then import (comma-separated ``module:Class``). A weights file
# or checkpoint that names ``some.module:Class`` would otherwise run that module's top-level code on loading (eval,
# analyze, export, model.init): a file's bytes do not get to choose code. The user's own objective.name is added
# (and, through the environment, reaches the processes a sweep or launcher starts).
TRUSTED_OBJECTIVES_ENV = "VITSCALE_OBJECTIVES"


def trusted_objectives() -> set[str]:
    return {n.strip() for n in os.environ.get(TRUSTED_OBJECTIVES_ENV, "").split(",") if n.strip()}


def trust(name: str) -> None:
    """Let files name the plugin objective ``name`` in this process and the ones it starts."""
    if ":" in name and name not in trusted_objectives():
        os.environ[TRUSTED_OBJECTIVES_ENV] = ",".join(sorted(trusted_objectives() | {name}))


def saved_objective_class(name: Any, where: str) -> type[Objective]:
    """:func:`objective_class` for a name read from a file (``where`` names it): a built-in or registered
    objective, or a plugin the user named (objective.name, or :data:`TRUSTED_OBJECTIVES_ENV`) or already imported.
    Anything else is a one-line ConfigError, and nothing is imported."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: its objective name {name!r} is not a name")
    if name in OBJECTIVES or ":" not in name:
        return objective_class(name)
    if name in trusted_objectives() or name.partition(":")[0] in sys.modules:
        return objective_class(name)
    shown = name if len(name) <= 80 else name[:77] + "..."
    raise ConfigError(f"{where} was written by the plugin objective {shown!r}, which vitscale imports only when "
                      f"you name it: set {TRUSTED_OBJECTIVES_ENV}={shown} (or use it as objective.name)")


def objective_for(cfg: Config) -> Objective:
    """The objective named by ``objective.name``, configured by ``cfg`` (a plugin named so is trusted: files may
    name it from then on)."""
    trust(cfg.objective.name)
    return objective_class(cfg.objective.name)(cfg)


def objective_of_weights(state_dict: dict[str, Any]) -> tuple[type[Objective], dict[str, Any]]:
    """(objective class, state dict in its key layout) for weights that do not say what trained them."""
    for cls in OBJECTIVES.values():
        adopted = cls.adopt(state_dict)
        if adopted is not None:
            return cls, adopted
    return OBJECTIVES[DEFAULT_OBJECTIVE], state_dict


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The one model factory (train, bench, plan, eval and analyze): the configured objective's model."""
    return objective_for(cfg).build_model(num_classes)


# Training-only settings: a model rebuilt from a saved config (for evaluation or analysis) has them off.
TRAINING_ONLY = {"drop_path": 0.0, "drop_rate": 0.0, "attn_drop_rate": 0.0, "proj_drop_rate": 0.0,
                 "grad_checkpointing": False}


def build_saved_model(model_cfg: dict[str, Any], objective: str = DEFAULT_OBJECTIVE, num_classes: int = 0,
                      objective_cfg: Optional[dict[str, Any]] = None) -> nn.Module:
    """:func:`build_model` for a saved ``model`` config section (a checkpoint's trainer_state.json, an exported
    file's metadata) and its saved ``objective`` section. Keys this version does not know are ignored, missing ones
    take their defaults, and the training-only regularisers are off (:data:`TRAINING_ONLY`)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in model_cfg.items() if k in known})
    cfg = Config(model=dataclasses.replace(model, **TRAINING_ONLY))
    saved = {k: v for k, v in (objective_cfg or {}).items() if v is not None and k != "name" and hasattr(cfg.objective, k)}
    cfg.objective = dataclasses.replace(cfg.objective, **saved, name=objective)
    return build_model(cfg, num_classes)


__all__ = ["DEFAULT_OBJECTIVE", "MODEL_KWARGS", "OBJECTIVES", "Objective", "Picture", "build_model", "build_saved_model",
           "model_kwargs", "objective_class", "objective_for", "objective_of_weights", "register", "saved_objective_class",
           "trust", "TRUSTED_OBJECTIVES_ENV"]
