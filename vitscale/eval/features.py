"""Shared evaluation plumbing: the Accelerator, the model under evaluation, labelled data and frozen features.

Every evaluation runs under one ``accelerate.Accelerator``: it picks the device (CPU when there is no GPU),
initialises the process group when launched with ``accelerate launch`` / ``torchrun`` (and needs nothing when
run as a single plain process), sets mixed precision, and gathers per-rank results. Each rank reads a disjoint
subset of the evaluation shards (``build_eval_loader`` splits samples by rank); features are gathered so every
rank then holds the same full feature matrix and computes the same probe, in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from accelerate import Accelerator
from accelerate.utils import gather_object

from vitscale.config.sources import describe, is_mix
from vitscale.data.evaluation import build_eval_loader
from vitscale.data.shards import ShardSet, resolve_shards
from vitscale.data.transforms import EvalTransform
from vitscale.models.vit import VisionTransformer
from vitscale.pixels import normalize
from vitscale.objectives import objective_class
from vitscale.weights import load_model

POOLS = ("model", "token", "avg")


def make_accelerator(device: str = "auto", precision: str = "no"):
    """One ``Accelerator`` for the whole evaluation. ``device``: auto | cpu | cuda; ``precision``: no | bf16 | fp16."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"--precision must be no, bf16 or fp16, got {precision!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    if use_cpu and precision == "fp16":
        raise ValueError("--precision fp16 needs a GPU (use bf16 or no on CPU)")
    return Accelerator(cpu=use_cpu, mixed_precision=precision)


# ----- the model ------------------------------------------------------------------------------------------------
@torch.no_grad()
def reinit_(model: VisionTransformer, seed: int) -> VisionTransformer:
    """Replace every weight with a fresh seeded initialisation (the "random init" baseline of the same
    architecture). Each leaf layer re-runs its own ``reset_parameters``; tokens and a sin-cos table are redone
    by the model's ``_init_tokens``."""
    resetters = [m for m in model.modules() if m is not model and hasattr(m, "reset_parameters")]
    # A parameter no reset_parameters owns would keep its trained value and pass for random (LayerScale's gammas
    # once did): refuse rather than report a baseline that is partly trained.
    covered = {id(p) for m in resetters for p in m.parameters(recurse=False)}
    covered |= {id(t) for t in (model.pos_embed, model.cls_token, model.reg_token) if t is not None}
    missed = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missed:
        raise ValueError(f"random init cannot re-initialise {', '.join(missed)} (no reset_parameters)")
    devices = {p.device for p in model.parameters()}
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
        torch.manual_seed(seed)
        for module in resetters:
            module.reset_parameters()
        model._init_tokens()
    return model


def load_encoder(path: Union[str, Path], device: Union[str, torch.device] = "cpu", random_init: bool = False,
                 seed: int = 0, model_name: Optional[str] = None, num_heads: Optional[int] = None
                 ) -> tuple[VisionTransformer, dict[str, Any]]:
    """The ViT that sees the images (an MAE's encoder), in eval mode, frozen, fp32, on ``device``.

    ``random_init`` keeps the architecture and re-initialises the weights with ``seed``; ``info["init"]``
    records which ("trained" | "random")."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    model, info = load_model(path, device=device, model_name=model_name, num_heads=num_heads)
    encoder = objective_class(info["objective"]).encoder(model)
    if random_init:
        reinit_(encoder, seed)
    info = {**info, "init": "random" if random_init else "trained", "init_seed": seed if random_init else None}
    return encoder.eval(), info


# ----- data -----------------------------------------------------------------------------------------------------
def val_spec_for(train_spec: str) -> str:
    """The held-out split that goes with a demo spec ("demo:digits" -> "demo:digits:val")."""
    parts = train_spec.split(":")
    if train_spec.startswith("demo:") and len(parts) == 2:
        return train_spec + ":val"
    raise ValueError(f"cannot guess the held-out shards for {train_spec!r}: pass --val-data")


def data_specs(train_spec: Optional[str], val_spec: Optional[str], info: Optional[dict] = None
               ) -> tuple[str, str]:
    """(train, val) shard specs: as given, else a checkpoint directory's own data config, else demo:X:val. The run's
    own held-out shards go only with the run's own training shards: with other ``--data`` they would be another
    data set, with other labels (measured: a probe trained on digits and scored on photos, 5% "accuracy")."""
    run_cfg = (info or {}).get("data_config") or {}
    own_data = not train_spec or train_spec == run_cfg.get("train_shards")
    train_spec = train_spec or run_cfg.get("train_shards")
    if not train_spec:
        raise ValueError("no training shards: pass --data (e.g. demo:digits)")
    if is_mix(train_spec):  # probes fit one labelled training set, not a weighted stream
        raise ValueError(f"the run trained on a mix of sources ({describe(train_spec)}): pass --data (one spec)")
    val_spec = val_spec or (run_cfg.get("val_shards") if own_data else None) or val_spec_for(train_spec)
    return train_spec, val_spec


def resolve_data(train_spec: Optional[str], val_spec: Optional[str], cache_dir: str,
                 info: Optional[dict] = None) -> tuple[ShardSet, ShardSet]:
    """(train, val) shard sets for :func:`data_specs`."""
    train_spec, val_spec = data_specs(train_spec, val_spec, info)
    return resolve_shards(train_spec, cache_dir), resolve_shards(val_spec, cache_dir)


def check_labels(labels: torch.Tensor, what: str) -> None:
    """Evaluations need a class per sample; shards without ``.cls`` members give label -1."""
    if labels.numel() == 0:
        raise ValueError(f"{what}: no samples read")
    missing = int((labels < 0).sum())
    if missing:
        raise ValueError(f"{what}: {missing} of {labels.numel()} samples have no label (.cls member); "
                         f"this evaluation needs labelled shards")


# ----- gathering across ranks -----------------------------------------------------------------------------------
def gather_rows(accelerator, rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``rows`` (first dimensions may differ by rank) on every rank, rank-major.

    Collectives need equal shapes, so each rank pads to the largest count and the padding is cut off again."""
    if accelerator.num_processes == 1:
        return rows
    rows = rows.to(accelerator.device)
    count = torch.tensor([rows.shape[0]], device=accelerator.device)
    counts = accelerator.gather(count).tolist()
    padded = accelerator.pad_across_processes(rows, dim=0)
    everything = accelerator.gather_for_metrics(padded)
    width = max(counts)
    return torch.cat([everything[i * width: i * width + n] for i, n in enumerate(counts)])


def gather_keys(accelerator, keys: list[str]) -> list[str]:
    if accelerator.num_processes == 1:
        return list(keys)

    return list(gather_object(list(keys)))  # every rank's list, concatenated rank-major


# ----- features -------------------------------------------------------------------------------------------------
@dataclass
class FeatureSet:
    """Frozen pre-logit features of one split, identical on every rank, sorted by sample key."""

    features: torch.Tensor  # (N, D) float32, CPU
    labels: torch.Tensor  # (N,) int64
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def pre_logits(model: VisionTransformer, x: torch.Tensor, pool: str = "model") -> torch.Tensor:
    """Image features before any classifier. ``model``: the model's own pooling (timm's
    ``forward_head(pre_logits=True)``: [CLS] or the mean of patch tokens, then its final norm); ``token``: the
    [CLS] output; ``avg``: the mean of the patch-token outputs."""
    tokens = model.forward_features(x)
    if pool == "model":
        return model.forward_head(tokens, pre_logits=True)
    if pool == "token":
        if not model.has_class_token:
            raise ValueError("--pool token: this model has no [CLS] token (use avg)")
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, model.num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"unknown pool {pool!r}: choose from {', '.join(POOLS)}")


@torch.no_grad()
def extract_features(model: nn.Module, shards: ShardSet, accelerator, *, img_size: int, batch_size: int = 256,
                     pool: str = "model", num_workers: int = 0, view: EvalTransform = EvalTransform()) -> FeatureSet:
    """Pre-logit features and labels of every sample in ``shards`` (each rank reads its part; all gathered)."""
    model.eval()
    loader = build_eval_loader(shards.urls, batch_size=batch_size, img_size=img_size,
                               rank=accelerator.process_index, world_size=accelerator.num_processes,
                               num_workers=num_workers, view=view)
    feats, labels, keys = [], [], []
    for batch in loader:
        images = normalize(batch["image"], accelerator.device)
        with accelerator.autocast():
            f = pre_logits(model, images, pool)
        feats.append(f.float().cpu())
        labels.append(batch["label"])
        keys.extend(batch["key"])
    dim = model.head_hidden_size if pool == "model" else model.num_features  # a rank with no samples: 0 rows
    local_f = torch.cat(feats) if feats else torch.zeros(0, dim)
    local_y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    all_f = gather_rows(accelerator, local_f).cpu()
    all_y = gather_rows(accelerator, local_y).cpu()
    all_k = gather_keys(accelerator, keys)
    # A fixed order (by key) makes results independent of the number of ranks.
    order = sorted(range(len(all_k)), key=all_k.__getitem__)
    return FeatureSet(all_f[order].contiguous(), all_y[order].contiguous(), [all_k[i] for i in order])


@torch.no_grad()
def load_images(shards: ShardSet, img_size: int, accelerator=None, batch_size: int = 256,
                limit: Optional[int] = None, view: EvalTransform = EvalTransform()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 (N,3,S,S), eval transform) and labels of a small split, on CPU, the same on every rank.

    Without ``limit``: every sample, in key order (ranks read disjoint parts, then gather). With ``limit``: the
    first ``limit`` samples in shard order, each rank reading them itself. Used by the robustness suite, which
    perturbs the same images many times."""
    split = accelerator is not None and accelerator.num_processes > 1 and limit is None
    rank, world = (accelerator.process_index, accelerator.num_processes) if split else (0, 1)
    loader = build_eval_loader(shards.urls, batch_size=batch_size, img_size=img_size, rank=rank, world_size=world,
                               view=view)
    images, labels, keys = [], [], []
    for batch in loader:
        images.append(batch["image"])
        labels.append(batch["label"])
        keys.extend(batch["key"])
        if limit is not None and len(keys) >= limit:
            break
    x = torch.cat(images) if images else torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    if limit is not None:
        return x[:limit].contiguous(), y[:limit].contiguous()
    if split:
        x = gather_rows(accelerator, x).cpu()
        y = gather_rows(accelerator, y).cpu()
        keys = gather_keys(accelerator, keys)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return x[order].contiguous(), y[order].contiguous()
