"""``model.init``: start a run's weights (not its optimizer or step) from another run, an export, timm or the MAE
release. Planned before anything is written (read, fitted to the model built on the meta device, refused with one
line if it does not fit), then copied into the real model -- under ZeRO-3 through the engine's gathered-parameters
context, so every rank ends with exactly its partition of the same weights a ZeRO-0 load gives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from vitscale.distributed import engine as eng
from vitscale.errors import ConfigError
from vitscale.objectives import TRUSTED_OBJECTIVES_ENV, saved_objective_class
from vitscale.weights.fit import DECODER_RE, Fit, encoder_of, fit_state_dict, to_model_keys
from vitscale.weights.sources import Weights, WeightsError, read_weights


def describe(weights: Weights) -> str:
    """What kind of source this is, in a few words for the report line."""
    if weights.source == "checkpoint":
        return f"vitscale checkpoint {weights.checkpoint}, step {weights.step}"
    if weights.source == "export":
        return f"vitscale export, step {weights.step}"
    keys = weights.state_dict
    if any(DECODER_RE.match(k) for k in keys) and not any(k.startswith("encoder.") for k in keys):
        return "MAE release format"
    return "state dict"


@dataclass
class InitPlan:
    """A fitted source, ready to copy into the model; ``apply`` copies it once and then frees the tensors."""
    path: str
    fit: Optional[Fit]
    report: str
    loaded: frozenset = field(default_factory=frozenset)  # canonical keys that come from the source

    def loads(self, key: str) -> bool:
        """Whether the (canonical) key ``key`` comes from the source."""
        return key in self.loaded

    def apply(self, model: nn.Module, log: Callable[[str], None] = print) -> None:
        """Copy the weights into ``model`` (the first call only: the tensors are freed afterwards)."""
        if self.fit is None:
            return
        copy_state(model, to_model_keys(model, self.fit.state_dict))
        self.fit = None
        log(self.report)


def plan_init(path: str, build_meta_model: Callable[[], nn.Module]) -> InitPlan:
    """Read ``path``, fit it to the model ``build_meta_model`` makes (called under the meta device) and describe
    the outcome in one line. Raises :class:`~vitscale.weights.sources.WeightsError` if it does not fit."""
    weights = read_weights(path)
    with torch.device("meta"):
        model = build_meta_model()
    try:
        fit = fit_state_dict(model, weights.state_dict, what=f"model.init={path}")
    except WeightsError as e:
        fit = _fit_exported_part(model, weights, path, e)
    notes = "".join(f"; {n}" for n in fit.notes)
    report = f"model.init: {len(fit.state_dict)} tensors loaded from {path} ({describe(weights)}){notes}"
    return InitPlan(str(path), fit, report, frozenset(fit.state_dict))


def _fit_exported_part(model: nn.Module, weights: Weights, path: str, full_error: WeightsError) -> Fit:
    """A run of an objective whose model wraps the ViT with parts of its own (a plugin's decoder) does not fit a
    plain ViT whole: fit the part its ``export_part`` names instead (what ``vitscale export`` would write), or
    raise the whole source's error when that changes nothing, does not fit either, or the target is no plain ViT
    (an MAE with another decoder width must be refused, not loaded without its decoder)."""
    if encoder_of(model) is not model:  # the target has parts of its own besides the ViT: the whole must fit
        raise full_error
    try:
        part, name = saved_objective_class(weights.objective, path).export_part(weights.state_dict, full=False) \
            if weights.part == "full" and weights.objective else (weights.state_dict, "full")
    except ConfigError as e:  # the objective that trained it cannot be imported here
        if TRUSTED_OBJECTIVES_ENV in str(e):  # it could, but only once the user names it: say so
            raise
        part, name = weights.state_dict, "full"
    if name == "full":
        raise full_error
    try:
        fit = fit_state_dict(model, part, what=f"model.init={path} (its {name})")
    except WeightsError:
        raise full_error from None
    fit.notes.insert(0, f"its {name} ({weights.objective}'s export_part; {len(weights.state_dict) - len(part)} "
                        f"tensors of its own left out)")
    return fit


@torch.no_grad()
def copy_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy ``sd`` (the model's own keys, a subset) into ``model``'s tensors in place, module by module (so under
    ZeRO-3 only one module's parameters are whole at a time). Every rank must call it."""
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        params = [(p, sd[dot + n]) for n, p in module.named_parameters(recurse=False) if dot + n in sd]
        if params:
            with eng.gathered_params([p for p, _ in params]):
                for p, value in params:
                    p.data.copy_(value.to(device=p.device, dtype=p.dtype).reshape(p.shape))
        for n, b in module.named_buffers(recurse=False):
            if dot + n in sd and b is not None:
                b.copy_(sd[dot + n].to(device=b.device, dtype=b.dtype))
