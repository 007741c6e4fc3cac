"""Objectives turn a batch into (loss, metrics). They know models, not engines or ranks."""
from __future__ import annotations

from typing import Callable

from vitscale.objectives.mae import mae_step
from vitscale.objectives.supervised import supervised_step

OBJECTIVES: dict[str, Callable] = {"supervised": supervised_step, "mae": mae_step}


def get_objective(name: str) -> Callable:
    return OBJECTIVES[name]
