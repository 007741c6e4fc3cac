"""Read a state dict, weights only, from every place weights come from.

Sources (``read_weights(path)``):
  * a vitscale run directory, ``checkpoints/`` directory or checkpoint directory: its latest complete checkpoint,
    consolidated from the (possibly ZeRO-sharded) DeepSpeed files; the model config comes from trainer_state.json;
  * a ``vitscale export`` file (``.safetensors`` with vitscale metadata);
  * a timm state dict: ``.safetensors``, ``.pth``, ``.pt`` or ``.bin``, bare or wrapped in ``{"model": ...}``,
    ``{"state_dict": ...}``, ``{"module": ...}`` and/or with ``module.`` / ``_orig_mod.`` key prefixes;
  * the MAE release format: a ``.pth`` holding ``{"model": ...}`` with encoder keys unprefixed plus ``decoder_*`` and
    ``mask_token`` keys;
  * a folder holding ``model.safetensors`` (``vitscale export --timm``, a Hugging Face download) or
    ``pytorch_model.bin``, when it is no run or checkpoint folder;
  * a timm training checkpoint ``model_best.pth.tar`` / ``checkpoint-N.pth.tar`` (its ``state_dict``, not the EMA's)
    and a Lightning ``.ckpt`` (its ``model.`` key prefix dropped).

Nothing is unpickled beyond tensors and plain containers (``torch.load(weights_only=True)``); a file that needs
more is refused with one line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from vitscale.config.schema import ObjectiveConfig
from vitscale.distributed.checkpoint import read_trainer_state, resolve_checkpoint
from vitscale.distributed.engine import consolidated_state_dict
from vitscale.distributed.safeload import safe_load
from vitscale.errors import CheckpointReadError, VitscaleError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")  # .pth.tar: timm's train.py (not a tar archive)
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")  # a weights folder's file, first found wins
WRAPPERS = ("model", "state_dict", "module")  # container keys around a state dict (MAE, Lightning, DeepSpeed)
PREFIXES = ("module.", "_orig_mod.")  # DDP/DeepSpeed wrappers and torch.compile
LIGHTNING_PREFIX = "model."


class WeightsError(VitscaleError, ValueError):
    """A weights source cannot be read, or does not fit the model it is meant for (one line, names the keys)."""


@dataclass
class Weights:
    """A state dict with what is known about where it came from."""
    state_dict: dict[str, torch.Tensor]
    path: str
    source: str  # "checkpoint" | "export" | "state_dict"
    model_cfg: Optional[dict[str, Any]] = None  # the writing run's model config (vitscale sources only)
    objective: Optional[str] = None  # the writing run's objective.name (vitscale sources only)
    part: Optional[str] = None  # "full" | "encoder" (vitscale sources only)
    step: Optional[int] = None
    objective_cfg: dict[str, Any] = field(default_factory=dict)  # the writing run's objective section, if known
    checkpoint: Optional[str] = None  # the checkpoint directory a run/ckpt path resolved to
    data_cfg: dict[str, Any] = field(default_factory=dict)  # the writing run's data section (an export: its eval keys)
    extra: dict[str, Any] = field(default_factory=dict)


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` prefixes (in any nesting) from every key."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    # A Lightning module holds the network as an attribute, conventionally ``model``: every key then starts with it
    # (no timm or vitscale key does).
    while out and all(k.startswith(LIGHTNING_PREFIX) for k in out):
        out = {k[len(LIGHTNING_PREFIX):]: v for k, v in out.items()}
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v)
                                                        for k, v in obj.items())


def unwrap(obj: Any, path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: itself, or under one of ``WRAPPERS`` (nested, e.g. {"model": {"module": ..}}).
    Non-tensor entries beside the tensors (e.g. a step counter) are ignored."""
    for _ in range(3):
        if _is_state_dict(obj):
            return obj
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
            if tensors:
                return tensors
            break
        obj = inner
    raise WeightsError(f"{path}: no state dict found (expected tensors, or one under "
                       f"{'/'.join(repr(w) for w in WRAPPERS)})")


def torch_load_weights(path: Path) -> Any:
    """``torch.load`` that runs no pickled code (:func:`vitscale.distributed.safeload.safe_load`); a file that
    would need it, or that is not a torch file at all, is one clear line."""
    try:
        return safe_load(path)
    except CheckpointReadError as e:
        text = str(e)
        if "Unsupported operand" in text or "invalid load key" in text:  # not a pickle at all
            raise WeightsError(f"{path}: not a readable torch file (corrupt or another format)") from None
        raise WeightsError(text) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{path}: not a readable torch file ({str(e).splitlines()[0] if str(e) else e!r})") from None


def _read_safetensors(path: Path) -> Weights:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if "vitscale_model" not in meta:
        return Weights(strip_prefixes(sd), str(path), "state_dict")
    objective_cfg = _json_dict(meta.get("vitscale_objective_config", "{}"))  # only refines the objective's defaults
    step = int(meta["step"]) if str(meta.get("step", "")).isdigit() else None
    data_cfg = _json_dict(meta.get("vitscale_data_config", "{}"))
    try:
        model_cfg = json.loads(meta["vitscale_model"])  # what is built from it: checked by weights/saved_model.py
    except (ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: its vitscale_model metadata is not JSON ({str(e)[:80]})") from None
    return Weights(strip_prefixes(sd), str(path), "export", model_cfg=model_cfg,
                   objective=meta.get("vitscale_objective"), part=meta.get("vitscale_part"), step=step,
                   objective_cfg=objective_cfg, data_cfg=data_cfg)


def _json_dict(text: str) -> dict[str, Any]:
    """A metadata entry that should hold a JSON object; {} for anything else (it only refines defaults)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." thousands deep
        return {}
    return value if isinstance(value, dict) else {}


def _with_folder_config(w: Weights, config: Path) -> Weights:
    """A timm hub folder's config.json (what `vitscale export --timm` writes too) beside a file without vitscale
    metadata: its architecture name and model_args stand in for --model / --num-heads, its pretrained_cfg for the
    eval keys. A config.json that is not such a JSON object is not used (the file then needs --model)."""
    if w.model_cfg is not None or not config.is_file():
        return w
    doc = _json_dict(config.read_text(errors="replace"))
    args = doc.get("model_args") if isinstance(doc.get("model_args"), dict) else {}
    arch = doc.get("architecture")
    name = re.sub(r"_\d+$", "", arch) if isinstance(arch, str) else None  # vit_large_patch16_224 -> vit_large_patch16
    if name is not None and isinstance(args.get("patch_size"), int):
        name = re.sub(r"_patch\d+$", f"_patch{args['patch_size']}", name)
    heads = args.get("num_heads")
    w.extra.update({k: v for k, v in (("model_name", name), ("num_heads", heads if isinstance(heads, int) else None))
                    if v is not None})
    w.extra["model_args"] = args  # what the tensors cannot say (pooling, fc_norm): weights/load.py reads it
    pretrained = doc.get("pretrained_cfg") if isinstance(doc.get("pretrained_cfg"), dict) else {}
    crop, interp = pretrained.get("crop_pct"), pretrained.get("interpolation")
    if isinstance(crop, (int, float)) and 0 < crop <= 1:
        w.data_cfg["eval_crop_pct"] = float(crop)
    if interp in ("bilinear", "bicubic"):
        w.data_cfg["interpolation"] = interp
    return w


def _read_checkpoint(path: Path) -> Weights:
    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise WeightsError(str(e)) from None
    state = read_trainer_state(ckpt)
    cfg = state.get("config", {})
    sd = strip_prefixes(consolidated_state_dict(ckpt))
    return Weights(sd, str(path), "checkpoint", model_cfg=cfg.get("model"),
                   objective=cfg.get("objective", {}).get("name", ObjectiveConfig.name), part="full",
                   step=state.get("step"), objective_cfg=cfg.get("objective", {}), checkpoint=str(ckpt),
                   data_cfg=cfg.get("data", {}), extra={"config": cfg})


def read_weights(path: Union[str, Path]) -> Weights:
    """Read any supported source (see the module docstring) into :class:`Weights`."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights not found: {path}")
    if path.is_dir():
        try:
            return _read_checkpoint(path)
        except WeightsError:  # a run or checkpoint folder wins; else the folder may hold one weights file
            inside = next((path / f for f in FOLDER_FILES if (path / f).is_file()), None)
            if inside is None:
                raise
            return _with_folder_config(read_weights(inside), path / "config.json")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES or "".join(path.suffixes[-2:]) in TORCH_SUFFIXES:
        return Weights(strip_prefixes(unwrap(torch_load_weights(path), path)), str(path), "state_dict")
    raise WeightsError(f"{path}: unknown weights format (expected a run or checkpoint directory, .safetensors, "
                       f"{', '.join(TORCH_SUFFIXES)})")
