"""``vitscale export RUN OUT_DIR --timm``: a folder timm loads without vitscale -- ``model.safetensors`` (timm's keys)
and timm's ``config.json`` (architecture, model_args, num_classes, global_pool, input size, mean/std, crop).

Load it with ``timm.create_model("local-dir:OUT_DIR", pretrained=True)`` (timm >= 1.0) or, naming the architecture
and its arguments yourself (config.json's ``architecture`` and ``model_args``), ``timm.create_model(ARCH,
pretrained=True, pretrained_cfg_overlay=dict(file=OUT_DIR + "/model.safetensors", num_classes=N), **model_args)``.
An MAE exports its encoder; a BatchNorm before the head (linear probe) is folded into the head, which is exactly
equivalent at inference.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

import torch

from vitscale.data.transforms import EvalTransform
from vitscale.distributed.checkpoint import resolve_checkpoint
from vitscale.distributed.ema import consolidated_ema
from vitscale.pixels import IMAGENET_MEAN, IMAGENET_STD
from vitscale.models.embed import HybridEmbed
from vitscale.weights.outfile import check_folder_path, check_weights_path, save_weights
from vitscale.weights.fit import encoder_of
from vitscale.weights.load import load_model
from vitscale.weights.sources import WeightsError

TIMM_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1408: "giant"}


def fold_head_norm(sd: dict[str, torch.Tensor], eps: float) -> dict[str, torch.Tensor]:
    """head(BN(x)) with BN = (x - mean) / sqrt(var + eps), no affine -> one Linear: W / s and b - W mean / s."""
    if "head_norm.running_mean" not in sd:
        return sd
    sd = dict(sd)
    mean, var = sd.pop("head_norm.running_mean").double(), sd.pop("head_norm.running_var").double()
    sd.pop("head_norm.num_batches_tracked", None)
    if "head.weight" in sd:
        w, b = sd["head.weight"].double(), sd["head.bias"].double()
        inv = (var + eps).rsqrt()
        sd["head.weight"] = (w * inv[None, :]).float()
        sd["head.bias"] = (b - w @ (mean * inv)).float()
    return sd


def timm_model_args(enc: Any) -> dict[str, Any]:
    """The keyword arguments that make timm's ``VisionTransformer`` the same network as ``enc``."""
    if isinstance(enc.patch_embed, HybridEmbed):
        raise WeightsError("--timm exports plain ViTs; a hybrid ResNet stem has no timm ViT equivalent")
    if enc.pos_embed is None:
        raise WeightsError("--timm: a ViT without a position table has no timm ViT equivalent")
    if hasattr(enc.pre_logits, "fc"):
        raise WeightsError("--timm: timm's ViT has no pre-logits layer (model.representation_size) any more: fine-tune "
                           "without it first (model.init drops it, as the ViT paper does), then export")
    first = enc.blocks[0]
    return dict(img_size=list(enc.patch_embed.img_size), patch_size=enc.patch_embed.patch_size[0],
                embed_dim=enc.embed_dim, depth=enc.depth, num_heads=enc.num_heads,
                mlp_ratio=enc.mlp_hidden_dim / enc.embed_dim, qkv_bias=first.attn.qkv.bias is not None,
                class_token=enc.has_class_token, global_pool=enc.global_pool,
                fc_norm=not isinstance(enc.fc_norm, torch.nn.Identity), num_classes=enc.num_classes,
                qk_norm=not isinstance(first.attn.q_norm, torch.nn.Identity), reg_tokens=enc.num_reg_tokens,
                **({"init_values": float(first.ls1.init_values)} if hasattr(first, "ls1") and
                   hasattr(first.ls1, "init_values") else {}))


def timm_config(enc: Any, view: EvalTransform = EvalTransform()) -> dict[str, Any]:
    args = timm_model_args(enc)
    size, patch = enc.embed_dim, args["patch_size"]
    arch = f"vit_{TIMM_SIZES.get(size, 'base')}_patch{patch}_224"
    try:
        import timm  # startup: timm adds 4.4 s to torch's import (measured, 2 cores); only this use needs it

        if not timm.is_model(arch):
            arch = "vit_base_patch16_224"  # every size is in model_args; the name only picks the builder
    except ImportError:
        pass
    h, w = args["img_size"]
    return {"architecture": arch, "num_classes": args["num_classes"], "num_features": enc.embed_dim,
            "global_pool": args["global_pool"], "model_args": args,
            "pretrained_cfg": {"input_size": [3, h, w], "fixed_input_size": True, "mean": list(IMAGENET_MEAN),
                               "std": list(IMAGENET_STD), "crop_pct": view.crop_pct, "crop_mode": "center",
                               "interpolation": view.interpolation, "num_classes": args["num_classes"],
                               "first_conv": "patch_embed.proj", "classifier": "head",
                               "license": "as the training data's"}}


def export_timm(ckpt: Union[str, Path], out_dir: Union[str, Path], ema: bool = False) -> dict[str, Any]:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` (``ema``: the model EMA's weights);
    returns a summary."""
    out = Path(out_dir)
    check_folder_path(out)  # before the model is built and loaded
    check_weights_path(out / "model.safetensors")
    model, info = load_model(ckpt)
    if ema:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in consolidated_ema(resolve_checkpoint(ckpt)).items():
                params[name].copy_(value.view(params[name].shape))
    enc = encoder_of(model)
    config = timm_config(enc, EvalTransform.of_run(info["data_config"]))
    eps = enc.head_norm.eps if isinstance(enc.head_norm, torch.nn.BatchNorm1d) else 0.0
    sd = fold_head_norm({k: v.detach().float().contiguous() for k, v in enc.state_dict().items()}, eps)
    save_weights(sd, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"path": str(out), "tensors": len(sd), "params": sum(v.numel() for v in sd.values()),
            "architecture": config["architecture"], "step": info["step"]}
