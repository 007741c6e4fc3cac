"""Rebuild a trained model from any weights source, for evaluation and analysis (training loads through
``model.init``, see :mod:`vitscale.weights.init`).

Sources are those of :func:`vitscale.weights.read_weights`. vitscale runs and exports carry their model config;
a plain timm-style file needs ``model_name`` (the other sizes are inferred from the tensor shapes; the head count
only where qk-norm records it, else it is the named variant's, or given when the widths differ). The model is
built on the meta device and the weights are assigned to it, so a large model costs its weights once in memory
and no random initialisation.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from vitscale.models.embed import HybridEmbed
from vitscale.models.registry import VARIANTS, parse_name
from vitscale.models.vit import mlp_hidden
from vitscale.objectives import build_saved_model, objective_of_weights, saved_objective_class
from vitscale.weights.saved_model import checked_data_record, checked_model_record, checked_objective_record
from vitscale.weights.fit import canonical, refuse, with_prefix_rows
from vitscale.weights.sources import Weights, WeightsError, read_weights

# LayerScale's starting gamma for a file that does not record it: timm's and CaiT's usual 1e-5. The trained gammas
# load over it; only the random-init baseline (eval --random-init) starts from it.
LAYERSCALE_INIT = 1e-5


def _infer_model_cfg(sd: dict[str, torch.Tensor], model_name: str, num_heads: Optional[int] = None
                     ) -> dict[str, Any]:
    """What a timm-style ViT's tensors say about it (no metadata): sizes, prefix tokens, pooling and block options,
    read from key names and shapes; ``model_name`` supplies the rest (and a head count the tensors do not record)."""
    _, _, named = parse_name(model_name)
    t = canonical(sd)  # the encoder's keys unprefixed, as model.init's fitting reads them
    cfg: dict[str, Any] = {"name": model_name, **_sizes(t, named), **_options(t)}
    heads = _num_heads(cfg.get("embed_dim", named["embed_dim"]), t.get("blocks.0.attn.q_norm.weight"), model_name,
                       num_heads)
    if heads is not None:
        cfg["num_heads"] = heads
    return cfg


def _sizes(t: dict[str, torch.Tensor], named: dict[str, Any]) -> dict[str, Any]:
    """Width, patch, depth, MLP width, registers and image size from the tensor shapes."""
    cfg: dict[str, Any] = {}
    w = t.get("patch_embed.proj.weight")
    if w is not None:
        cfg["embed_dim"] = w.shape[0]
        if "hybrid_layers" not in named:
            cfg["patch_size"] = w.shape[-1]
    width = cfg.get("embed_dim", named["embed_dim"])
    depth = len({k.split(".")[1] for k in t if k.startswith("blocks.")})
    if depth:
        cfg["depth"] = depth
    fc1 = t.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.shape[0] != mlp_hidden(width, named.get("mlp_ratio", 4.0)):
        cfg["mlp_ratio"] = fc1.shape[0] / width  # mlp_hidden gives fc1's width back exactly
    if "reg_token" in t:
        cfg["reg_tokens"] = t["reg_token"].shape[1]
    pos = t.get("pos_embed")
    if pos is not None:
        n = pos.shape[1] - (1 if "cls_token" in t else 0) - cfg.get("reg_tokens", 0)
        side = math.isqrt(n)
        if side * side == n:
            cfg["img_size"] = side * cfg.get("patch_size", named["patch_size"])
    return cfg


def _options(t: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Options a key's presence or absence tells: [CLS], pooling and its norm, LayerScale, qkv bias, qk-norm, the
    position table and a pre-logits layer. Only what differs from the model defaults is set."""
    cfg: dict[str, Any] = {}
    if "cls_token" not in t:
        cfg["class_token"] = False
    if "cls_token" not in t or "fc_norm.weight" in t:  # timm's avg pooling puts its norm after the pooling
        cfg["global_pool"] = "avg"
        if "fc_norm.weight" not in t:
            cfg["fc_norm"] = False
    if "blocks.0.ls1.gamma" in t:  # the trained gammas load; their start (only random init uses it) is not saved
        cfg["init_values"] = LAYERSCALE_INIT
    if "blocks.0.attn.qkv.weight" in t and "blocks.0.attn.qkv.bias" not in t:
        cfg["qkv_bias"] = False
    if "blocks.0.attn.q_norm.weight" in t:
        cfg["qk_norm"] = True
    if "patch_embed.proj.weight" in t and "pos_embed" not in t:
        cfg["pos_embed"] = "none"
    if "pre_logits.fc.weight" in t:  # timm's older in21k files: the ViT paper's pre-training hidden layer
        cfg["representation_size"] = t["pre_logits.fc.weight"].shape[0]
    return cfg


def _num_heads(width: int, q_norm: Optional[torch.Tensor], model_name: str, num_heads: Optional[int]
               ) -> Optional[int]:
    """The head count of a timm-style file: exact from qk-norm (its width is the head width), else as given,
    else the named variant's (None) when the widths agree. A guess (width // 64) would build another network
    that loads without complaint, so a width the variant does not have is refused, naming what to pass."""
    if q_norm is not None:
        return width // q_norm.shape[0]
    if num_heads is not None:
        if num_heads < 1 or width % num_heads:
            raise WeightsError(f"--num-heads {num_heads} does not divide the weights' width {width}")
        return num_heads
    _, _, named = parse_name(model_name)
    if width == named["embed_dim"]:
        return None
    same = [f"--model vit_{size}_patch{named['patch_size']} ({v['num_heads']} heads)"
            for size, v in VARIANTS.items() if v["embed_dim"] == width]
    raise WeightsError(f"the weights are {width} wide but {model_name} is {named['embed_dim']} wide, and a file "
                       f"without qk-norm does not record its head count: pass --num-heads N"
                       + "".join(f" or {s}" for s in same))


def _no_embed_class_padded(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's no_embed_class layout (DeiT-III, the *_reg4_* models: position rows for the patches only) with zero
    rows for the prefix tokens, as vitscale's table has them and model.init's fitting adds them: the image size is
    then read from a square grid, and the table loads as it is."""
    key = "encoder.pos_embed" if "encoder.pos_embed" in sd else "pos_embed"
    if key not in sd:
        return sd
    t = canonical(sd)
    prefix = (1 if "cls_token" in t else 0) + (t["reg_token"].shape[1] if "reg_token" in t else 0)
    padded = with_prefix_rows(sd[key], prefix)
    return sd if padded is sd[key] else {**sd, key: padded}


def _known_name(name: Optional[str]) -> Optional[str]:
    """NAME when the registry builds it (a timm architecture such as vit_so400m_patch14 may not be)."""
    try:
        return name if name is not None and parse_name(name) else None
    except ValueError:
        return None


# What a timm hub folder's config.json (model_args) says that the tensors cannot: pooling and its norm above all
# ([CLS] + avg pooling without fc_norm has the keys of [CLS] pooling).
FOLDER_ARGS = ("global_pool", "fc_norm", "class_token", "qkv_bias", "reg_tokens", "init_values", "mlp_ratio",
               "qk_norm")


def _model_record(w: Weights, sd: dict[str, torch.Tensor], path: Path, model_name: Optional[str],
                  num_heads: Optional[int]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the model config to build, the state dict in its layout): the file's record, checked; else inferred from
    the tensors, a timm folder's config.json and ``model_name`` / ``num_heads``."""
    m = w.model_cfg
    if m is not None:
        if num_heads is not None:
            raise WeightsError(f"{path} records its model (vitscale metadata): --num-heads is only for files "
                               f"without it")
        named = m if model_name is None or not isinstance(m, dict) else {**m, "name": model_name}
        return checked_model_record(named, sd, str(path)), sd
    model_name = model_name or _known_name(w.extra.get("model_name"))  # a timm folder's config.json
    num_heads = num_heads or w.extra.get("num_heads")
    if model_name is None:
        raise WeightsError(f"{path} has no vitscale metadata: pass the model name (e.g. --model vit_base_patch16)")
    sd = _no_embed_class_padded(sd)
    m = _infer_model_cfg(sd, model_name, num_heads)
    given = {k: v for k, v in (w.extra.get("model_args") or {}).items() if k in FOLDER_ARGS}
    return (checked_model_record({**m, **given}, sd, str(path)) if given else m), sd


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
               model_name: Optional[str] = None, num_heads: Optional[int] = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained model (eval mode, fp32, on ``device``) and describe it.

    Returns ``(model, info)``. ``model`` is what the objective that trained it rebuilds for these weights
    (:meth:`vitscale.objectives.Objective.rebuild`: a classifier, an MAE, or an MAE encoder exported alone).
    ``info`` has: ``path``, ``source`` ("safetensors" | "checkpoint"), ``name`` (model name), ``objective``,
    ``objective_cfg`` (the run's objective section; {} when unknown), ``part``, ``step``, ``is_hybrid``,
    ``img_size``, ``patch_size`` (pixel stride between tokens), ``grid_size``, ``num_prefix_tokens``,
    ``num_classes``, ``pos_embed_type`` ("learn" | "sincos" | "none"), ``params``, ``model_cfg``, ``data_config``
    (the run's data section, an export's eval keys; {} when unknown).
    ``model_name`` is only needed for files without vitscale metadata; ``num_heads`` too when such a file's width is
    not the named variant's and it has no qk-norm (the only tensors that record the head count).
    """
    path = Path(path)
    w = read_weights(path)
    sd = w.state_dict
    if w.objective is not None:
        objective = saved_objective_class(w.objective, str(path))
    else:  # a state dict that does not say what trained it: the objective that recognises it, else a classifier
        objective, sd = objective_of_weights(sd)
    part = w.part or "full"
    m, sd = _model_record(w, sd, path, model_name, num_heads)
    objective_cfg = checked_objective_record(w.objective_cfg, str(path))

    def build(num_classes: int) -> nn.Module:  # the one model factory (vitscale.objectives), as in training
        return build_saved_model(m, w.objective or objective.name, num_classes, objective_cfg)

    with torch.device("meta"):
        model = objective.rebuild(build, sd, part)
    _assign(model, sd, path, m["name"])
    model = model.to(device=device, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    enc = objective.encoder(model)
    info = {
        "path": str(path), "source": "safetensors" if w.source == "export" else w.source,
        "checkpoint": w.checkpoint, "name": m["name"], "objective": w.objective or objective.name,
        "objective_cfg": dict(objective_cfg), "part": part, "step": w.step,
        "is_hybrid": isinstance(enc.patch_embed, HybridEmbed),
        "img_size": list(enc.patch_embed.img_size), "patch_size": list(enc.patch_embed.patch_size),
        "grid_size": list(enc.patch_embed.grid_size), "num_prefix_tokens": enc.num_prefix_tokens,
        "num_classes": enc.num_classes, "embed_dim": enc.embed_dim, "depth": enc.depth, "num_heads": enc.num_heads,
        "pos_embed_type": enc.pos_embed_type if enc.pos_embed is not None else "none",
        "params": sum(p.numel() for p in model.parameters()), "model_cfg": m,
        "data_config": checked_data_record(w.data_cfg, str(path)),
    }
    return model, info


def _assign(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Load ``sd`` into the meta-device ``model`` by assignment; every tensor must match and none be left. What does
    not match is one line naming the keys, as model.init's (``fit.refuse``)."""
    target = model.state_dict(keep_vars=True)
    bad_shape = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in sd.items()
                 if k in target and tuple(v.shape) != tuple(target[k].shape)]
    refuse(f"{path}: the weights (as {name})", sorted(set(target) - set(sd)), sorted(set(sd) - set(target)),
           bad_shape)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # anything the checks above did not foresee is still one line
        raise WeightsError(f"{path}: weights do not load into {name}: {str(e).splitlines()[-1].strip()}") from None
    meta_left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta_left:
        raise WeightsError(f"{path}: no weights for {meta_left[:5]}")
