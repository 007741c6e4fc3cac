"""A model record read from a file (an export's metadata, a checkpoint's trainer_state.json) checked before a model
is built from it: the record says how large a network to build, and only the tensors beside it are real. A record
of depth 10**7 built blocks for 12 hours before anything failed; a width of "abc" or heads of 0 were tracebacks."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vitscale.config.checks import check_model_sizes
from vitscale.config.load import build_section
from vitscale.config.schema import Config, ModelConfig, ObjectiveConfig
from vitscale.data.transforms import EVAL_CROP_FRACTION, INTERPOLATIONS
from vitscale.errors import ConfigError
from vitscale.models.registry import parse_name
from vitscale.weights.fit import canonical
from vitscale.weights.sources import WeightsError

# Far above any ViT built (ViT-22B: depth 48, width 6144, 48 heads), far below a size that takes hours to build.
SIZE_LIMITS = {"depth": 1024, "decoder_depth": 1024, "embed_dim": 65536, "decoder_embed_dim": 65536,
               "num_heads": 4096, "decoder_num_heads": 4096, "img_size": 16384, "patch_size": 4096,
               "reg_tokens": 4096, "representation_size": 65536}


def checked_model_record(record: Any, sd: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """``record`` (a saved ``model`` section) when it describes a model that can be built and that the tensors
    ``sd`` belong to: keys of its version this one does not know are dropped, each value has its key's type and
    range, every size is below :data:`SIZE_LIMITS`, and the encoder's depth and width are the tensors'. Otherwise a
    one-line WeightsError naming ``where``."""
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise WeightsError(f"{where}: its model record is not a model config (a mapping with a name)")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    kept = {k: v for k, v in record.items() if k in known}
    try:
        model = build_section(ModelConfig, kept, "model.")
        check_model_sizes(Config(model=model))
        parse_name(model.name)
    except (ConfigError, ValueError) as e:
        raise WeightsError(f"{where}: its model record cannot be built ({e})") from None
    for key, limit in SIZE_LIMITS.items():
        value = getattr(model, key, None)
        if isinstance(value, int) and value > limit:
            raise WeightsError(f"{where}: its model record says model.{key}={value}, beyond any ViT ({limit})")
    _check_against_tensors(model, sd, where)
    return kept


def _check_against_tensors(model: ModelConfig, sd: dict[str, torch.Tensor], where: str) -> None:
    """The encoder's depth and width as the tensors have them (when they have blocks and a patch embedding)."""
    _, _, named = parse_name(model.name)
    t = canonical(sd)
    depth = len({k.split(".")[1] for k in t if k.startswith("blocks.")})
    want_depth = model.depth if model.depth is not None else named["depth"]
    if depth and depth != want_depth:
        raise WeightsError(f"{where}: its model record says depth {want_depth} but its tensors hold {depth} blocks")
    proj = t.get("patch_embed.proj.weight")
    want_width = model.embed_dim if model.embed_dim is not None else named["embed_dim"]
    if proj is not None and proj.ndim >= 1 and proj.shape[0] != want_width:
        raise WeightsError(f"{where}: its model record says width {want_width} but its patch embedding is "
                           f"{proj.shape[0]} wide")


def checked_objective_record(record: Any, where: str) -> dict[str, Any]:
    """A saved ``objective`` section's keys this version knows, each of its key's type ({} for a record that is no
    mapping: the objective's defaults then apply); a value of another type is a one-line WeightsError."""
    if not isinstance(record, dict):
        return {}
    known = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    kept = {k: v for k, v in record.items() if k in known and v is not None}
    try:
        build_section(ObjectiveConfig, kept, "objective.")
    except ConfigError as e:
        raise WeightsError(f"{where}: its objective record cannot be used ({e})") from None
    return kept


def checked_data_record(record: Any, where: str) -> dict[str, Any]:
    """A saved ``data`` section whose held-out-image keys (``EVAL_VIEW_KEYS``) are usable: ``eval_crop_pct`` in
    (0, 1], ``interpolation`` one of :data:`INTERPOLATIONS` ({} for a record that is no mapping). A bad one failed
    every held-out image ('no samples read') or was written into an export's timm config."""
    if not isinstance(record, dict):
        return {}
    crop, interp = record.get("eval_crop_pct", EVAL_CROP_FRACTION), record.get("interpolation", "bilinear")
    if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
        raise WeightsError(f"{where}: its data record has eval_crop_pct={crop!r}, not a number in (0, 1]")
    if interp not in INTERPOLATIONS:
        raise WeightsError(f"{where}: its data record has interpolation={interp!r}, not one of "
                           f"{', '.join(INTERPOLATIONS)}")
    return dict(record)
