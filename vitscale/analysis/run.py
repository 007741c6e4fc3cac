"""``vitscale analyze``: load a model, run the analyses, write PNGs and ``analysis.json``.

Attention is computed one image and one block at a time (each block's (heads, N, N) map is reduced to the
rollout, the distances and the chosen head's [CLS] row before the next block runs), so memory stays at one
layer's attention map even for large models and images.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from vitscale.analysis import plots
from vitscale.analysis.attention import (mean_attention_distance_layer, patch_distance_matrix,
                                         query_attention_to_patches, rollout_step, rollout_to_patches)
from vitscale.analysis.filters import patch_filter_pca
from vitscale.analysis.images import denormalize, load_images, normalize
from vitscale.weights import encoder_of, load_model
from vitscale.weights.load import DEFAULT_NORM_PIX_LOSS
from vitscale.analysis.pos_embed import pos_embed_similarity, similarity_stats
from vitscale.models.vit import VisionTransformer

HYBRID_FILTERS_NOTE = ("not applicable to hybrid models: the first layer is the ResNet stem's 7x7 stride-2 "
                       "convolution, not a linear projection of pixel patches; tokens are a 1x1 projection of "
                       "ResNet features, so there are no pixel-space patch filters to decompose")
HYBRID_DISTANCE_NOTE = ("hybrid model: distances are between token centres on the ResNet stem's output grid, "
                        "one token every {stride} pixels (the stem's effective stride); each token already sees a "
                        "receptive field much larger than {stride} pixels, so these distances understate the "
                        "spatial reach of attention")
SECTIONS = ("rollout", "layers", "distance", "pos_embed", "filters", "mae")
NO_CLS_NOTE = "the model has no [CLS] token: maps show the mean over all patch queries instead of the [CLS] row"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "image"


def _unique(names: list[str]) -> list[str]:
    """Per-image files are named after the image: a/x.png and b/x.png become x and x_2, not one overwritten file."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def attention_pass(enc: VisionTransformer, x: torch.Tensor, head: Optional[int], discard_ratio: float = 0.0
                   ) -> dict[str, Any]:
    """One image batch through the encoder, block by block. Returns CPU tensors: ``rollout`` (B, gh, gw),
    ``distance`` (depth, B, heads) in pixels, ``layer_maps`` (depth, B, gh, gw) raw [CLS] attention of ``head``.
    """
    npt = enc.num_prefix_tokens
    grid = enc.patch_embed.grid_size
    stride = enc.patch_embed.patch_size
    distances = patch_distance_matrix(grid, stride, device=x.device)
    tokens = enc._embed(x)
    rollout, dist, layer_maps = None, [], []
    for blk in enc.blocks:
        tokens, attn = blk(tokens, return_attn=True)
        rollout = rollout_step(rollout, attn, npt, discard_ratio)
        dist.append(mean_attention_distance_layer(attn, distances, npt).float().cpu())
        layer_maps.append(query_attention_to_patches(attn, npt, grid, head).cpu())
        del attn
    return {"rollout": rollout_to_patches(rollout, npt, grid).cpu(), "distance": torch.stack(dist),
            "layer_maps": torch.stack(layer_maps)}


@torch.no_grad()
def mae_reconstruct(model, x: torch.Tensor, mask_ratio: float, norm_pix_loss: bool, seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """Mask and reconstruct normalised images ``x``. Returns pixel-space (normalised) ``reconstruction``,
    ``mask_image`` (1 = hidden), per-image ``mse`` on the hidden patches, and the model's own ``loss``.

    With ``norm_pix_loss`` the decoder predicts each patch normalised by its own mean and variance; to draw
    it, the prediction is mapped back with the true patch's statistics (as the MAE paper's visualisations do)."""
    torch.manual_seed(seed)
    if x.is_cuda:
        torch.cuda.manual_seed(seed)
    loss, pred, mask = model(x, mask_ratio=mask_ratio)
    target = model.patchify(x)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    mse = (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    mask_img = model.unpatchify(mask[..., None].expand(-1, -1, pred.shape[-1]).to(pred.dtype))
    return {"reconstruction": model.unpatchify(pred), "mask_image": mask_img, "mse": mse, "loss": loss}


def _grid_summary(m: torch.Tensor) -> dict[str, Any]:
    flat = m.flatten().double()
    p = flat / flat.sum() if flat.sum() > 0 else torch.full_like(flat, 1 / flat.numel())
    ent = float(-(p * p.clamp(min=1e-30).log()).sum())
    idx = int(flat.argmax())
    gw = m.shape[-1]
    out = {"max": float(flat.max()), "min": float(flat.min()), "entropy_nats": ent,
           "entropy_ratio": ent / math.log(flat.numel()) if flat.numel() > 1 else 1.0,
           "peak_row": idx // gw, "peak_col": idx % gw}
    if flat.numel() <= 1024:
        out["map"] = [[round(float(v), 6) for v in row] for row in m]
    return out


def analyze(path: Union[str, Path], images: Sequence[Union[str, Path]] = (), out: Union[str, Path] = "analysis",
            head: int = 0, discard_ratio: float = 0.0, mask_ratio: float = 0.75, device: str = "auto",
            seed: int = 0, model_name: Optional[str] = None, num_filters: int = 28,
            norm_pix_loss: Optional[bool] = None, only: Optional[Sequence[str]] = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every analysis that applies to the model at ``path``; write PNGs and ``analysis.json`` to ``out``.

    ``only``: a subset of ``SECTIONS`` (rollout, layers, distance, pos_embed, filters, mae); default all.
    Returns the JSON document (also written). ``log`` gets one line per file written and per note.
    """
    todo = set(SECTIONS if not only else only)
    unknown = sorted(todo - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    model, info = load_model(path, device=dev, model_name=model_name)
    enc = encoder_of(model)
    if not 0 <= head < enc.num_heads:
        raise ValueError(f"--head {head} is out of range: the model has {enc.num_heads} heads (0..{enc.num_heads - 1})")
    grid = tuple(enc.patch_embed.grid_size)
    stride = tuple(enc.patch_embed.patch_size)
    npt = enc.num_prefix_tokens
    label = f"{info['name']} ({info['objective']}" + (f", step {info['step']})" if info["step"] is not None else ")")
    files: list[str] = []
    notes: list[str] = []

    def wrote(p: Path) -> None:
        files.append(str(p))
        log(f"wrote {p}")

    def note(msg: str) -> None:
        notes.append(msg)
        log(f"note: {msg}")

    imgs_u8, names = load_images(list(images), tuple(enc.patch_embed.img_size))
    names = _unique([_safe(n) for n in names])
    x_all = normalize(imgs_u8).to(dev)
    shown = [denormalize(x) for x in x_all]
    doc: dict[str, Any] = {"model": {k: v for k, v in info.items() if k != "model_cfg"},
                           "model_config": info["model_cfg"], "device": str(dev), "images": names}
    if npt == 0:
        note(NO_CLS_NOTE)

    # ----- attention: rollout, per-layer maps, mean distance ----------------------------------------------
    if todo & {"rollout", "layers", "distance"}:
        passes = [attention_pass(enc, x_all[i:i + 1], head, discard_ratio) for i in range(len(names))]
        att: dict[str, Any] = {"head": head, "discard_ratio": discard_ratio, "head_fusion": "mean",
                               "grid_size": list(grid), "token_stride_px": list(stride)}
        doc["attention"] = att
        if "rollout" in todo:
            rollouts = torch.cat([p["rollout"] for p in passes])  # (B, gh, gw)
            wrote(plots.plot_rollout(shown, [r.numpy() for r in rollouts], names, out / "attention_rollout.png",
                                     f"Attention rollout, {label}"))
            att["rollout"] = {name: _grid_summary(rollouts[i]) for i, name in enumerate(names)}
        if "layers" in todo:
            who = "[CLS]" if npt else "mean query"
            for i, name in enumerate(names):
                maps = [m[0].numpy() for m in passes[i]["layer_maps"]]
                wrote(plots.plot_layer_attention(shown[i], maps, out / f"attention_layers_head{head}_{name}.png",
                                                 f"{name}: raw attention of {who} to patches, head {head}, {label}"))
            att["layer_attention_head"] = {name: [_grid_summary(m[0]) | {"sum": float(m[0].sum())}
                                                  for m in passes[i]["layer_maps"]] for i, name in enumerate(names)}
        if "distance" in todo:
            dist = torch.cat([p["distance"] for p in passes], dim=1)  # (depth, B, heads)
            mean_dist = dist.mean(dim=1)  # (depth, heads)
            uniform_px = float(patch_distance_matrix(grid, stride).mean())
            if info["is_hybrid"]:
                att["note"] = HYBRID_DISTANCE_NOTE.format(stride=stride[0])
                note(att["note"])
            wrote(plots.plot_mean_distance(mean_dist.numpy(), out / "mean_attention_distance.png",
                                           f"Mean attention distance, {label}\n(averaged over {len(names)} images; "
                                           f"{grid[0]}x{grid[1]} tokens, {stride[0]} px apart)",
                                           uniform_px=uniform_px))
            att["mean_distance_px"] = [[round(float(v), 4) for v in row] for row in mean_dist]
            att["mean_distance_px_per_image"] = {name: [[round(float(v), 4) for v in row] for row in dist[:, i]]
                                                 for i, name in enumerate(names)}
            att["uniform_distance_px"] = uniform_px

    # ----- position embeddings ----------------------------------------------------------------------------
    if "pos_embed" not in todo:
        pass
    elif enc.pos_embed is None:
        doc["pos_embed"] = {"skipped": "the model has no absolute position embedding"}
        note("pos-embed similarity skipped: " + doc["pos_embed"]["skipped"])
    else:
        sim = pos_embed_similarity(enc.pos_embed.detach().float().cpu(), npt)
        kind = {"learn": "learned 1-D", "sincos": "fixed 2-D sin-cos"}.get(info["pos_embed_type"],
                                                                          info["pos_embed_type"])
        wrote(plots.plot_pos_embed_similarity(sim.numpy(), grid, out / "pos_embed_similarity.png",
                                              f"Position embedding similarity ({kind})\n{label}"))
        doc["pos_embed"] = {"type": info["pos_embed_type"], "grid_size": list(grid), **similarity_stats(sim, grid)}

    # ----- patch-embedding filters ------------------------------------------------------------------------
    if "filters" not in todo:
        pass
    elif info["is_hybrid"]:
        doc["filters"] = {"skipped": HYBRID_FILTERS_NOTE}
        note("patch-filter PCA skipped: " + HYBRID_FILTERS_NOTE)
    else:
        pca = patch_filter_pca(enc.patch_embed.proj.weight.float().cpu(), k=num_filters)
        k = len(pca.explained_variance)
        wrote(plots.plot_filters(pca.components.numpy(), pca.explained_variance_ratio.numpy(),
                                 out / "patch_filters_pca.png",
                                 f"Patch-embedding filters: top {k} principal components "
                                 f"({stride[0]}x{stride[1]} RGB, each min-max scaled)\n{label}"))
        doc["filters"] = {"num_components": k, "filter_shape": list(enc.patch_embed.proj.weight.shape[1:]),
                          "explained_variance": pca.explained_variance.tolist(),
                          "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
                          "cumulative_ratio": pca.explained_variance_ratio.cumsum(0).tolist()}

    # ----- MAE reconstructions ----------------------------------------------------------------------------
    if "mae" not in todo:
        pass
    elif info["is_mae"]:
        npl = norm_pix_loss if norm_pix_loss is not None else info["norm_pix_loss"]
        if npl is None:
            npl = DEFAULT_NORM_PIX_LOSS
            note(f"the file does not record objective.norm_pix_loss; assuming {npl} (override with "
                 f"--norm-pix-loss/--no-norm-pix-loss)")
        rec = mae_reconstruct(model, x_all, mask_ratio, npl, seed)
        rows = []
        for i, name in enumerate(names):
            m = rec["mask_image"][i]
            masked = x_all[i] * (1 - m)
            masked_img = denormalize(masked)
            masked_img[m[0].cpu().numpy() > 0.5] = 0.5  # hidden patches in grey
            rows.append({"name": name, "original": shown[i], "masked": masked_img,
                         "reconstruction": denormalize(rec["reconstruction"][i]),
                         "pasted": denormalize(masked + rec["reconstruction"][i] * m),
                         "mse": float(rec["mse"][i]), "mask_ratio": mask_ratio})
        how = "per-patch mean/var of the original restored" if npl else "pixels predicted directly"
        wrote(plots.plot_mae_reconstruction(rows, out / "mae_reconstruction.png",
                                            f"MAE reconstruction, mask ratio {mask_ratio} (seed {seed}; {how})\n"
                                            f"{label}"))
        doc["mae"] = {"mask_ratio": mask_ratio, "seed": seed, "norm_pix_loss": bool(npl),
                      "masked_mse": {name: float(rec["mse"][i]) for i, name in enumerate(names)},
                      "model_loss": float(rec["loss"])}
    elif info["objective"] == "mae":
        doc["mae"] = {"skipped": "encoder-only export: the decoder is needed (export with --full, or pass the "
                                 "checkpoint directory)"}
        note("MAE reconstruction skipped: " + doc["mae"]["skipped"])

    doc["notes"] = notes
    doc["files"] = [Path(f).name for f in files]
    (out / "analysis.json").write_text(json.dumps(doc, indent=1))
    log(f"wrote {out / 'analysis.json'}")
    return doc
