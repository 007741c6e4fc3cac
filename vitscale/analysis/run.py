"""``vitscale analyze``: load a model, run the analyses, write PNGs and ``analysis.json``.

Attention is computed one image and one block at a time (each block's (heads, N, N) map is reduced to the
rollout, the distances and the chosen head's [CLS] row before the next block runs), so memory stays at one
layer's attention map even for large models and images.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from vitscale.analysis import plots
from vitscale.analysis.attention import (mean_attention_distance_layer, patch_distance_matrix,
                                         query_attention_to_patches, rollout_step, rollout_to_patches)
from vitscale.analysis.filters import patch_filter_pca
from vitscale.analysis.images import open_images, sample_images, to_batch
from vitscale.weights.load import load_model
from vitscale.analysis.pos_embed import pos_embed_similarity, similarity_stats
from vitscale.pixels import denormalize, normalize
from vitscale.objectives import OBJECTIVES, objective_class
from vitscale.models.vit import VisionTransformer
from vitscale.weights.outfile import check_folder_path

HYBRID_FILTERS_NOTE = ("not applicable to hybrid models: the first layer is the ResNet stem's 7x7 stride-2 "
                       "convolution, not a linear projection of pixel patches; tokens are a 1x1 projection of "
                       "ResNet features, so there are no pixel-space patch filters to decompose")
HYBRID_DISTANCE_NOTE = ("hybrid model: distances are between token centres on the ResNet stem's output grid, "
                        "one token every {stride} pixels (the stem's effective stride); each token already sees a "
                        "receptive field much larger than {stride} pixels, so these distances understate the "
                        "spatial reach of attention")
# What analyze computes for every ViT, then what the objectives add (each objective's ``analysis_section``).
SECTIONS = ("rollout", "layers", "distance", "pos_embed", "filters") + tuple(
    cls.analysis_section for cls in OBJECTIVES.values() if cls.analysis_section)
NO_CLS_NOTE = "the model has no [CLS] token: maps show the mean over all patch queries instead of the [CLS] row"
AVG_POOL_NOTE = ("the model's classifier reads the mean of the patch tokens (global_pool=avg), not its [CLS] token: "
                 "maps show the mean over all patch queries instead of the unused [CLS] row")


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


def reads_cls(enc: VisionTransformer) -> bool:
    """Whether the classifier's input is the [CLS] row. A [CLS] token alone does not say so: with global_pool=avg
    (every MAE fine-tuning recipe) the head reads the patch mean and the [CLS] output is discarded."""
    return bool(enc.has_class_token and enc.global_pool == "token")


def resolve_device(device: str = "auto") -> torch.device:
    """``--device`` as a torch device, or a one-line error (a bad name, or CUDA where there is none: torch's own
    errors are tracebacks from deep inside the first tensor move)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is available here (use --device cpu or auto)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: there are {count} CUDA GPUs (cuda:0..cuda:{count - 1})")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: analyze runs on auto, cpu, cuda or cuda:N")
    return dev


@torch.no_grad()
def attention_pass(enc: VisionTransformer, x: torch.Tensor, head: Optional[int], discard_ratio: float = 0.0
                   ) -> dict[str, Any]:
    """One image batch through the encoder, block by block. Returns CPU tensors: ``rollout`` (B, gh, gw),
    ``distance`` (depth, B, heads) in pixels, ``layer_maps`` (depth, B, gh, gw) raw [CLS] attention of ``head``.
    """
    npt, cls = enc.num_prefix_tokens, reads_cls(enc)
    grid = enc.patch_embed.grid_size
    stride = enc.patch_embed.patch_size
    distances = patch_distance_matrix(grid, stride, device=x.device)
    tokens = enc._embed(x)
    rollout, dist, layer_maps = None, [], []
    for blk in enc.blocks:
        tokens, attn = blk(tokens, return_attn=True)
        rollout = rollout_step(rollout, attn, npt, discard_ratio)
        dist.append(mean_attention_distance_layer(attn, distances, npt).float().cpu())
        layer_maps.append(query_attention_to_patches(attn, npt, grid, head, has_cls=cls).cpu())
        del attn
    return {"rollout": rollout_to_patches(rollout, npt, grid, has_cls=cls).cpu(),
            "distance": torch.stack(dist), "layer_maps": torch.stack(layer_maps)}


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


@dataclass
class _Run:
    """What every analysis reads (the model, the images) and adds to (files written, notes)."""

    model: torch.nn.Module
    info: dict[str, Any]
    enc: VisionTransformer
    device: torch.device
    out: Path
    names: list[str]
    x: torch.Tensor  # the images, normalised, on the device
    shown: list  # the same images as displayable (H, W, 3) arrays in [0, 1]
    log: Callable[[str], None]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.enc.patch_embed.grid_size)

    @property
    def stride(self) -> tuple[int, int]:
        return tuple(self.enc.patch_embed.patch_size)

    @property
    def label(self) -> str:
        info = self.info
        return f"{info['name']} ({info['objective']}" + (f", step {info['step']})" if info["step"] is not None
                                                         else ")")

    def wrote(self, p: Path) -> None:
        self.files.append(str(p))
        self.log(f"wrote {p}")

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.log(f"note: {msg}")


def _sections(only: Optional[Sequence[str]]) -> set[str]:
    todo = set(SECTIONS if not only else only)
    unknown = sorted(todo - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {', '.join(SECTIONS)}")
    return todo


def _check_options(mask_ratio: Optional[float], num_filters: int) -> None:
    """Options whose range does not depend on the model: refused before anything is read or written."""
    if mask_ratio is not None and not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1) (the fraction of patches hidden), got {mask_ratio}")
    if num_filters < 1:
        raise ValueError(f"--num-filters must be >= 1 (principal components drawn), got {num_filters}")


def _prepare(path: Union[str, Path], images: Sequence[Union[str, Path]], out: Path, dev: torch.device, head: int,
             model_name: Optional[str], num_heads: Optional[int], log: Callable[[str], None]) -> _Run:
    """Load the model and the images (resized to the model's input, normalised as in training). The image files
    are decoded first: a bad one is named before a large model is read."""
    pics, names = open_images(list(images)) if images else sample_images()
    model, info = load_model(path, device=dev, model_name=model_name, num_heads=num_heads)
    enc = objective_class(info["objective"]).encoder(model)
    if not 0 <= head < enc.num_heads:
        raise ValueError(f"--head {head} is out of range: the model has {enc.num_heads} heads (0..{enc.num_heads - 1})")
    imgs_u8 = to_batch(pics, tuple(enc.patch_embed.img_size))
    x = normalize(imgs_u8).to(dev)
    shown = [denormalize(v).permute(1, 2, 0).cpu().numpy() for v in x]
    return _Run(model, info, enc, dev, out, _unique([_safe(n) for n in names]), x, shown, log)


# ----- attention: rollout, per-layer maps, mean distance ------------------------------------------------------
def _attention(run: _Run, todo: set[str], head: int, discard_ratio: float) -> dict[str, Any]:
    passes = [attention_pass(run.enc, run.x[i:i + 1], head, discard_ratio) for i in range(len(run.names))]
    att: dict[str, Any] = {"head": head, "discard_ratio": discard_ratio, "head_fusion": "mean",
                           "grid_size": list(run.grid), "token_stride_px": list(run.stride)}
    if "rollout" in todo:
        att["rollout"] = _rollout(run, passes)
    if "layers" in todo:
        att["layer_attention_head"] = _layer_maps(run, passes, head)
    if "distance" in todo:
        att.update(_distance(run, passes))
    return att


def _rollout(run: _Run, passes: list[dict]) -> dict[str, Any]:
    rollouts = torch.cat([p["rollout"] for p in passes])  # (B, gh, gw)
    run.wrote(plots.plot_rollout(run.shown, [r.numpy() for r in rollouts], run.names,
                                 run.out / "attention_rollout.png", f"Attention rollout, {run.label}"))
    return {name: _grid_summary(rollouts[i]) for i, name in enumerate(run.names)}


def _layer_maps(run: _Run, passes: list[dict], head: int) -> dict[str, Any]:
    who = "[CLS]" if reads_cls(run.enc) else "mean query"
    for i, name in enumerate(run.names):
        maps = [m[0].numpy() for m in passes[i]["layer_maps"]]
        run.wrote(plots.plot_layer_attention(run.shown[i], maps, run.out / f"attention_layers_head{head}_{name}.png",
                                             f"{name}: raw attention of {who} to patches, head {head}, {run.label}"))
    return {name: [_grid_summary(m[0]) | {"sum": float(m[0].sum())} for m in passes[i]["layer_maps"]]
            for i, name in enumerate(run.names)}


def _distance(run: _Run, passes: list[dict]) -> dict[str, Any]:
    grid, stride = run.grid, run.stride
    dist = torch.cat([p["distance"] for p in passes], dim=1)  # (depth, B, heads)
    mean_dist = dist.mean(dim=1)  # (depth, heads)
    uniform_px = float(patch_distance_matrix(grid, stride).mean())
    res: dict[str, Any] = {}
    if run.info["is_hybrid"]:
        res["note"] = HYBRID_DISTANCE_NOTE.format(stride=stride[0])
        run.note(res["note"])
    run.wrote(plots.plot_mean_distance(mean_dist.numpy(), run.out / "mean_attention_distance.png",
                                       f"Mean attention distance, {run.label}\n(averaged over {len(run.names)} "
                                       f"images; {grid[0]}x{grid[1]} tokens, {stride[0]} px apart)",
                                       uniform_px=uniform_px))
    res["mean_distance_px"] = [[round(float(v), 4) for v in row] for row in mean_dist]
    res["mean_distance_px_per_image"] = {name: [[round(float(v), 4) for v in row] for row in dist[:, i]]
                                         for i, name in enumerate(run.names)}
    res["uniform_distance_px"] = uniform_px
    return res


# ----- position embeddings, patch-embedding filters -----------------------------------------------------------
def _pos_embed(run: _Run) -> dict[str, Any]:
    enc = run.enc
    if enc.pos_embed is None:
        res = {"skipped": "the model has no absolute position embedding"}
        run.note("pos-embed similarity skipped: " + res["skipped"])
        return res
    sim = pos_embed_similarity(enc.pos_embed.detach().float().cpu(), enc.num_prefix_tokens)
    kind = {"learn": "learned 1-D", "sincos": "fixed 2-D sin-cos"}.get(run.info["pos_embed_type"],
                                                                      run.info["pos_embed_type"])
    run.wrote(plots.plot_pos_embed_similarity(sim.numpy(), run.grid, run.out / "pos_embed_similarity.png",
                                              f"Position embedding similarity ({kind})\n{run.label}"))
    return {"type": run.info["pos_embed_type"], "grid_size": list(run.grid), **similarity_stats(sim, run.grid)}


def _filters(run: _Run, num_filters: int) -> dict[str, Any]:
    if run.info["is_hybrid"]:
        run.note("patch-filter PCA skipped: " + HYBRID_FILTERS_NOTE)
        return {"skipped": HYBRID_FILTERS_NOTE}
    weight = run.enc.patch_embed.proj.weight
    pca = patch_filter_pca(weight.float().cpu(), k=num_filters)
    k = len(pca.explained_variance)
    run.wrote(plots.plot_filters(pca.components.numpy(), pca.explained_variance_ratio.numpy(),
                                 run.out / "patch_filters_pca.png",
                                 f"Patch-embedding filters: top {k} principal components "
                                 f"({run.stride[0]}x{run.stride[1]} RGB, each min-max scaled)\n{run.label}"))
    return {"num_components": k, "filter_shape": list(weight.shape[1:]),
            "explained_variance": pca.explained_variance.tolist(),
            "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
            "cumulative_ratio": pca.explained_variance_ratio.cumsum(0).tolist()}


def analyze(path: Union[str, Path], images: Sequence[Union[str, Path]] = (), out: Union[str, Path] = "analysis",
            head: int = 0, discard_ratio: float = 0.0, mask_ratio: Optional[float] = None, device: str = "auto",
            seed: int = 0, model_name: Optional[str] = None, num_filters: int = 28,
            norm_pix_loss: Optional[bool] = None, only: Optional[Sequence[str]] = None,
            log: Callable[[str], None] = print, num_heads: Optional[int] = None) -> dict[str, Any]:
    """Run every analysis that applies to the model at ``path``; write PNGs and ``analysis.json`` to ``out``.

    ``only``: a subset of ``SECTIONS`` (rollout, layers, distance, pos_embed, filters, and the objectives' own
    sections, e.g. MAE reconstructions); default all. ``mask_ratio`` None: the run's own.
    Returns the JSON document (also written). ``log`` gets one line per file written and per note.
    """
    todo = _sections(only)
    _check_options(mask_ratio, num_filters)
    dev = resolve_device(device)
    out = Path(out)
    check_folder_path(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    run = _prepare(path, images, out, dev, head, model_name, num_heads, log)
    doc: dict[str, Any] = {"model": {k: v for k, v in run.info.items() if k != "model_cfg"},
                           "model_config": run.info["model_cfg"], "device": str(run.device), "images": run.names}
    if not reads_cls(run.enc):
        run.note(AVG_POOL_NOTE if run.enc.has_class_token else NO_CLS_NOTE)
    if todo & {"rollout", "layers", "distance"}:
        doc["attention"] = _attention(run, todo, head, discard_ratio)
    if "pos_embed" in todo:
        doc["pos_embed"] = _pos_embed(run)
    if "filters" in todo:
        doc["filters"] = _filters(run, num_filters)
    objective = objective_class(run.info["objective"])
    if objective.analysis_section and objective.analysis_section in todo:
        section = objective.analyze(run, mask_ratio, seed, norm_pix_loss)
        if section is not None:
            doc[objective.analysis_section] = section
    doc["notes"] = run.notes
    doc["files"] = [Path(f).name for f in run.files]
    (out / "analysis.json").write_text(json.dumps(doc, indent=1))
    log(f"wrote {out / 'analysis.json'}")
    return doc
