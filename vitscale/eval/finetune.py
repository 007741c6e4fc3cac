"""End-to-end fine-tuning of a pretrained ViT (the MAE paper's recipe, scaled down): a fresh linear head,
layer-wise learning-rate decay, stochastic depth (drop-path), label smoothing, AdamW with warmup + cosine.

Options live in :class:`FinetuneConfig` (a YAML file such as ``configs/eval/finetune_digits.yaml`` plus
``key=value`` overrides), separate from the training schema. Runs under the evaluation's ``Accelerator`` (DDP when
launched with several processes); the data comes through the same WebDataset stream as pretraining.
"""
from __future__ import annotations

import difflib
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.data.pipeline import build_train_loader
from vitscale.data.shards import ShardSet
from vitscale.data.transforms import normalize
from vitscale.eval.classify import evaluate_classifier
from vitscale.models.layers import DropPath
from vitscale.models.vit import VisionTransformer
from vitscale.optim import lr_at, param_groups


@dataclass
class FinetuneConfig:
    # Optimizer steps.
    steps: int = 300
    # Images per step per process.
    batch_size: int = 64
    # Peak learning rate; None = blr x global batch / 256 (the MAE scaling rule).
    lr: Optional[float] = None
    # Base learning rate for the scaling rule.
    blr: float = 1e-3
    # AdamW weight decay (none on norms, biases, position table and [CLS]).
    weight_decay: float = 0.05
    # Layer-wise LR decay: block i of L gets lr x layer_decay^(L + 1 - (i + 1)); the head gets lr.
    layer_decay: float = 0.75
    # Stochastic depth at the last block, linear in depth from 0 at the first.
    drop_path: float = 0.1
    # Label smoothing of the cross-entropy.
    label_smoothing: float = 0.1
    # Linear warmup steps, then cosine to min_lr.
    warmup_steps: int = 20
    min_lr: float = 1e-6
    # RandomResizedCrop minimum area fraction (the data stream's augmentation).
    crop_min_scale: float = 0.35
    # Gradient-norm clipping (0 = off).
    grad_clip: float = 0.0
    # Seed of the head, the data order and the drop-path draws.
    seed: int = 0
    # DataLoader workers per process.
    num_workers: int = 0
    # Evaluate on the held-out shards every N steps as well as at the end (0 = only at the end).
    eval_every: int = 0
    # Initial std of the new head's weights (MAE: 2e-5, so the start is close to a uniform prediction).
    head_init_std: float = 2e-5
    # Classifier input: "token" ([CLS]), "avg" (mean of patch tokens, then LayerNorm: timm's layout) or "auto"
    # (avg for MAE encoders, as the MAE paper fine-tunes; the model's own pooling otherwise).
    global_pool: str = "auto"


_FIELDS = {f.name: f for f in fields(FinetuneConfig)}


def _convert(key: str, value: Any, default: Any) -> Any:
    """A YAML value or a command-line string -> the option's type (lossless conversions only)."""
    if isinstance(default, str):
        return str(value)
    if isinstance(value, str):
        import yaml

        parsed = yaml.safe_load(value)
        value = parsed if not isinstance(parsed, str) else value
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 leaves "1e-3" a string
            except ValueError:
                pass
    if default is None:  # lr: None or a float
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return None if value is None else float(value)
    elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"finetune option {key}: expected {type(default).__name__ if default is not None else 'a number'}"
                     f", got {value!r}")


def load_finetune_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Defaults, then the YAML file (keys at the top level or under ``finetune:``), then ``key=value`` overrides.
    Unknown keys are a one-line ``ValueError`` naming the closest valid key."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"finetune config not found: {path}")
        doc = yaml.safe_load(path.read_text()) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping of finetune options")
        values.update(doc.get("finetune", doc) if isinstance(doc.get("finetune"), dict) else doc)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        values[key.strip().removeprefix("finetune.")] = value
    cfg = FinetuneConfig()
    for key, value in values.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown finetune option {key!r}{hint}")
        setattr(cfg, key, _convert(key, value, getattr(FinetuneConfig, key, None)))
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError("finetune steps and batch_size must be >= 1")
    if cfg.global_pool not in ("auto", "token", "avg"):
        raise ValueError(f"finetune global_pool must be auto, token or avg, got {cfg.global_pool!r}")
    if not 0 < cfg.layer_decay <= 1:
        raise ValueError(f"finetune layer_decay must be in (0, 1], got {cfg.layer_decay}")
    return cfg


def set_drop_path(model: VisionTransformer, rate: float) -> None:
    """Stochastic depth linear in depth (0 at the first block, ``rate`` at the last), as at construction."""
    depth = len(model.blocks)
    for i, block in enumerate(model.blocks):
        p = rate * i / max(depth - 1, 1)
        block.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        block.drop_path2 = DropPath(p) if p > 0 else nn.Identity()


def set_pooling(model: VisionTransformer, pool: str) -> None:
    """Switch between [CLS] and average pooling in timm's layouts: token = final ``norm`` on every token then
    [CLS]; avg = mean of patch tokens then ``fc_norm``. The trained LayerNorm moves to the new place (the MAE
    code drops it and starts a fresh one; moving it keeps its learned scale), so the result loads as a plain
    timm-style ViT with that ``global_pool``."""
    if pool == model.global_pool:
        return
    if pool == "avg":
        if isinstance(model.fc_norm, nn.Identity):
            model.fc_norm, model.norm = model.norm, nn.Identity()
    else:
        if not model.has_class_token:
            raise ValueError("global_pool token: this model has no [CLS] token")
        if isinstance(model.norm, nn.Identity):
            model.norm, model.fc_norm = model.fc_norm, nn.Identity()
    model.global_pool = pool


def prepare_for_finetuning(model: VisionTransformer, num_classes: int, cfg: FinetuneConfig,
                           is_mae: bool = False) -> VisionTransformer:
    """Set the pooling, unfreeze (a fixed sin-cos table stays fixed), set drop-path, put a fresh seeded head on."""
    pool = cfg.global_pool if cfg.global_pool != "auto" else ("avg" if is_mae else model.global_pool)
    set_pooling(model, pool)
    for name, p in model.named_parameters():
        p.requires_grad_(not (name == "pos_embed" and model.pos_embed_type == "sincos"))
    set_drop_path(model, cfg.drop_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model.reset_classifier(num_classes)
        nn.init.trunc_normal_(model.head.weight, std=cfg.head_init_std)
        nn.init.zeros_(model.head.bias)
    return model


def finetune(model: VisionTransformer, train_shards: ShardSet, val_shards: ShardSet, num_classes: int,
             cfg: FinetuneConfig, accelerator, *, img_size: int, eval_batch_size: int = 256, is_mae: bool = False,
             log=print) -> tuple[VisionTransformer, dict]:
    """Fine-tune ``model`` (changed in place) and evaluate it; returns (the unwrapped model, results)."""
    device = accelerator.device
    model = prepare_for_finetuning(model, num_classes, cfg, is_mae).to(device)
    global_batch = cfg.batch_size * accelerator.num_processes
    peak = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999))
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = build_train_loader(train_shards.urls, batch_size=cfg.batch_size, img_size=img_size, seed=cfg.seed,
                                rank=accelerator.process_index, world_size=accelerator.num_processes,
                                num_workers=cfg.num_workers, crop_min_scale=cfg.crop_min_scale)
    batches = iter(loader)
    torch.manual_seed(cfg.seed * 1000 + 1 + accelerator.process_index)  # drop-path draws, per rank
    history: list[dict] = []
    evals: list[dict] = []
    start = time.perf_counter()
    log_every = max(1, cfg.steps // 10)
    model.train()
    for step in range(cfg.steps):
        lr = lr_at(step, peak, cfg.warmup_steps, cfg.steps, cfg.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batch = next(batches)
        labels = batch["label"].to(device)
        if bool((labels < 0).any()):
            raise ValueError("fine-tuning needs labelled shards (.cls members)")
        with accelerator.autocast():
            logits = model(normalize(batch["image"], device))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        acc = float((logits.argmax(-1) == labels).float().mean())
        history.append({"step": step + 1, "loss": float(loss.detach()), "train_acc": acc, "lr": lr})
        if (step + 1) % log_every == 0:
            recent = history[-log_every:]
            log(f"finetune: step {step + 1}/{cfg.steps} loss {sum(h['loss'] for h in recent) / len(recent):.4f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            evals.append({"step": step + 1, **evaluate_classifier(model, val_shards, accelerator, img_size=img_size,
                                                                   batch_size=eval_batch_size)})
    seconds = time.perf_counter() - start
    final = evaluate_classifier(model, val_shards, accelerator, img_size=img_size, batch_size=eval_batch_size)
    evals.append({"step": cfg.steps, **final})
    model = accelerator.unwrap_model(model).eval()
    return model, {**final, "config": asdict(cfg), "global_pool": model.global_pool, "peak_lr": peak,
                   "global_batch": global_batch, "history": history, "evals": evals, "train_seconds": seconds}


def save_finetuned(model: VisionTransformer, info: dict, path: Union[str, Path], steps: int) -> Path:
    """Weights + the metadata ``vitscale export`` writes, so ``eval``/``analyze`` load the result like any
    exported supervised model."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model_cfg = {**(info.get("model_cfg") or {}), "global_pool": model.global_pool}
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"vitscale_model": json.dumps(model_cfg), "vitscale_objective": "supervised", "vitscale_part": "full",
            "step": str(steps), "vitscale_finetuned_from": str(info.get("path"))}
    save_file(sd, str(path), metadata=meta)
    return path
