"""Rebuild a trained model from any weights source, for evaluation and analysis (training loads through
``model.init``, see :mod:`vitscale.weights.init`).

Sources are those of :func:`vitscale.weights.read_weights`. vitscale runs and exports carry their model config;
a plain timm-style file needs ``model_name`` (the other sizes are inferred from the tensor shapes). The model is
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
from vitscale.models.mae import MaskedAutoencoderViT
from vitscale.models.registry import parse_name
from vitscale.models.vit import VisionTransformer
from vitscale.objectives import build_saved_model
from vitscale.weights.fit import DECODER_RE
from vitscale.weights.sources import WeightsError, read_weights

# Schema default of objective.norm_pix_loss (used when the source does not say).
DEFAULT_NORM_PIX_LOSS = True


def _infer_model_cfg(sd: dict[str, torch.Tensor], model_name: str, prefix: str) -> dict[str, Any]:
    """Sizes of a timm-style ViT from its tensor shapes (no metadata)."""
    _, _, named = parse_name(model_name)
    cfg: dict[str, Any] = {"name": model_name}
    w = sd.get(prefix + "patch_embed.proj.weight")
    if w is not None:
        cfg["embed_dim"] = w.shape[0]
        if "hybrid_layers" not in named:
            cfg["patch_size"] = w.shape[-1]
    depth = len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "blocks.")})
    if depth:
        cfg["depth"] = depth
    pos = sd.get(prefix + "pos_embed")
    patch = cfg.get("patch_size", named["patch_size"])
    reg = sd.get(prefix + "reg_token")
    if reg is not None:
        cfg["reg_tokens"] = reg.shape[1]
    if pos is not None:
        n = pos.shape[1] - (1 if prefix + "cls_token" in sd else 0) - cfg.get("reg_tokens", 0)
        side = math.isqrt(n)
        if side * side == n:
            cfg["img_size"] = side * patch
    q_norm = sd.get(prefix + "blocks.0.attn.q_norm.weight")
    if q_norm is not None:  # qk-norm: the norm's width is the head width, so the head count is known exactly
        cfg["qk_norm"] = True
        cfg["num_heads"] = cfg.get("embed_dim", named["embed_dim"]) // q_norm.shape[0]
    elif cfg.get("embed_dim") and cfg["embed_dim"] != named["embed_dim"]:
        cfg["num_heads"] = max(1, cfg["embed_dim"] // 64)  # the usual 64-wide heads
    return cfg


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
               model_name: Optional[str] = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained model (eval mode, fp32, on ``device``) and describe it.

    Returns ``(model, info)``. ``model`` is a ``VisionTransformer`` (supervised, or an MAE encoder exported
    alone) or a ``MaskedAutoencoderViT`` (MAE checkpoint or ``export --full``). ``info`` has: ``path``,
    ``source`` ("safetensors" | "checkpoint"), ``name`` (model name), ``objective``, ``part``, ``step``,
    ``is_mae``, ``is_hybrid``, ``img_size``, ``patch_size`` (pixel stride between tokens), ``grid_size``,
    ``num_prefix_tokens``, ``num_classes``, ``pos_embed_type`` ("learn" | "sincos" | "none"),
    ``norm_pix_loss`` (MAE; None when unknown), ``params``, ``model_cfg``.
    ``model_name`` is only needed for safetensors files without vitscale metadata.
    """
    path = Path(path)
    w = read_weights(path)
    sd = w.state_dict
    if any(DECODER_RE.match(k) for k in sd) and not any(k.startswith("encoder.") for k in sd):  # MAE release
        sd = {k if DECODER_RE.match(k) else "encoder." + k: v for k, v in sd.items()}
    src = {"source": "safetensors" if w.source == "export" else w.source, "checkpoint": w.checkpoint,
           "model_cfg": w.model_cfg, "objective": w.objective, "part": w.part, "step": w.step,
           "norm_pix_loss": w.norm_pix_loss}
    is_full_mae = any(k.startswith("encoder.") for k in sd) and any(k.startswith("decoder_") for k in sd)
    objective = src["objective"] or ("mae" if is_full_mae else "supervised")
    part = src["part"] or ("full" if is_full_mae or objective != "mae" else "encoder")
    m = src["model_cfg"]
    if m is None:
        if model_name is None:
            raise WeightsError(f"{path} has no vitscale metadata: pass the model name (e.g. --model "
                               f"vit_base_patch16)")
        m = _infer_model_cfg(sd, model_name, "encoder." if is_full_mae else "")
    elif model_name is not None:
        m = {**m, "name": model_name}
    base = m["name"][4:] if m["name"].startswith("mae_") else m["name"]
    m_base = {**m, "name": base}

    with torch.device("meta"):  # the one model factory (vitscale.objectives), as in training
        if objective == "mae":
            model = build_saved_model(m_base, "mae", norm_pix_loss=bool(src["norm_pix_loss"]))
            if part != "full":
                model = model.encoder  # an exported MAE encoder: sin-cos table, [CLS] pooling, no head
        else:
            head = sd.get("head.weight")
            model = build_saved_model(m_base, "supervised", num_classes=int(head.shape[0]) if head is not None else 0)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise WeightsError(f"{path}: weights do not match model {m['name']!r} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    meta_left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta_left:
        raise WeightsError(f"{path}: no weights for {meta_left[:5]}")
    model = model.to(device=device, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    enc: VisionTransformer = model.encoder if isinstance(model, MaskedAutoencoderViT) else model
    info = {
        "path": str(path), "source": src["source"], "checkpoint": src.get("checkpoint"), "name": m["name"],
        "objective": objective, "part": part, "step": src["step"],
        "is_mae": isinstance(model, MaskedAutoencoderViT),
        "is_hybrid": isinstance(enc.patch_embed, HybridEmbed),
        "img_size": list(enc.patch_embed.img_size), "patch_size": list(enc.patch_embed.patch_size),
        "grid_size": list(enc.patch_embed.grid_size), "num_prefix_tokens": enc.num_prefix_tokens,
        "num_classes": enc.num_classes, "embed_dim": enc.embed_dim, "depth": enc.depth, "num_heads": enc.num_heads,
        "pos_embed_type": enc.pos_embed_type if enc.pos_embed is not None else "none",
        "norm_pix_loss": src["norm_pix_loss"] if objective == "mae" else None,
        "params": sum(p.numel() for p in model.parameters()), "model_cfg": m,
    }
    return model, info


load_model_for_analysis = load_model  # the name analysis and eval used before this module existed
