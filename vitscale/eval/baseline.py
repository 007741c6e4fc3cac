"""The CNN baseline of the robustness suite: torchvision's ResNet-18 adapted to small images, trained by the trainer's
own step (``Trainer.step`` over :class:`vitscale.train.plain.PlainEngine`, no DeepSpeed) under the evaluation's
``Accelerator``.

"Same data and steps" as the ViT: the same training shards through the same WebDataset stream (same seed,
augmentation and batch size), for the same number of optimizer steps, with AdamW, warmup + cosine and label
smoothing as in the demo recipe. "Same size" unless told otherwise: the ResNet's width is chosen so that its
parameter count matches the ViT's (:func:`width_for_params`); a full-width ResNet-18 (11M parameters, 1.1 GFLOPs
per 32 px image) against the 0.8M-parameter demo ViT would be a different comparison, at 14x the FLOPs of the
sized one (width 17, 79 MFLOPs).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

from vitscale.config.schema import Config
from vitscale.data.pipeline import build_train_loader
from vitscale.data.shards import ShardSet
from vitscale.distributed.env import detect_env
from vitscale.distributed.safeload import safe_load
from vitscale.train import TrainState, Trainer, Window
from vitscale.train.plain import PlainEngine

BASELINE_FILE = "baseline_resnet18.pt"
MAX_WIDTH = 512  # widest baseline the sizing picks (64 = the standard ResNet-18, 11M parameters)


def resnet18_small(num_classes: int, width: int = 64) -> nn.Module:
    """torchvision ``resnet18`` for 32-64 px inputs: a 3x3 stride-1 stem convolution and no max-pool (so a
    32 px image still has a 4x4 map in the last stage), ``num_classes`` outputs. ``width`` is the first stage's
    channel count (64 = the standard ResNet-18; the stages double it); smaller widths keep CPU tests fast."""
    from torchvision.models.resnet import BasicBlock, ResNet, resnet18

    if width < 1:
        raise ValueError(f"ResNet width must be >= 1, got {width}")
    model = resnet18(num_classes=num_classes) if width == 64 else ResNet(BasicBlock, [2, 2, 2, 2], num_classes)
    model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.maxpool = nn.Identity()
    if width != 64:
        model.inplanes = width  # torchvision's _make_layer reads the running channel count from here
        model.layer1 = model._make_layer(BasicBlock, width, 2)
        model.layer2 = model._make_layer(BasicBlock, width * 2, 2, stride=2)
        model.layer3 = model._make_layer(BasicBlock, width * 4, 2, stride=2)
        model.layer4 = model._make_layer(BasicBlock, width * 8, 2, stride=2)
        model.fc = nn.Linear(width * 8, num_classes)
    for m in model.modules():  # torchvision's own init, re-applied to the replaced layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@dataclass
class BaselineConfig:
    """How the CNN baseline is trained (defaults: the demo recipe; the CLI fills steps/batch from the ViT run and
    the width from the ViT's parameter count)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    label_smoothing: float = 0.1
    crop_min_scale: float = 0.6
    interpolation: str = "bilinear"  # of its crops: the ViT run's data.interpolation
    width: int = 64
    seed: int = 0
    num_workers: int = 0


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resnet18_params(num_classes: int, width: int) -> int:
    """Parameters of :func:`resnet18_small`, counted on a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return count_params(resnet18_small(num_classes, width))


def width_for_params(params: int, num_classes: int, max_width: int = MAX_WIDTH) -> int:
    """The first-stage width whose ResNet-18 has the parameter count closest (as a ratio) to ``params``: the CNN
    baseline is sized to the ViT it is compared with, not fixed at the 11M parameters of width 64. The count grows
    with the width (about quadratically), so a bisection finds the first width at or above ``params``."""
    if params < 1:
        raise ValueError(f"cannot size a baseline to a model of {params} parameters")
    lo, hi = 1, max_width
    while lo < hi:
        mid = (lo + hi) // 2
        if resnet18_params(num_classes, mid) >= params:
            hi = mid
        else:
            lo = mid + 1
    return min({max(lo - 1, 1), lo}, key=lambda w: abs(math.log(resnet18_params(num_classes, w) / params)))


def forward_flops(model: nn.Module, img_size: int, device: Optional[torch.device] = None) -> int:
    """FLOPs of one image's forward pass (matmuls and convolutions as 2*M*N*K), by torch's own counter, so the
    ViT and the CNN are counted the same way."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, img_size, img_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # accelerate's mixed_precision -> train.precision


def trainer_config(cfg: BaselineConfig, img_size: int, precision: str = "fp32") -> Config:
    """The training config the baseline's steps run under: supervised cross-entropy with label smoothing, AdamW at
    ``cfg.lr`` with warmup + cosine, no clipping (the baseline never clipped), the ViT run's batch and length."""
    out = Config()
    out.objective.name, out.objective.label_smoothing = "supervised", cfg.label_smoothing
    out.optim.lr, out.optim.weight_decay, out.optim.warmup_steps = cfg.lr, cfg.weight_decay, cfg.warmup_steps
    out.optim.grad_clip = 0.0
    out.train.steps, out.train.precision, out.train.seed = cfg.steps, precision, cfg.seed
    out.data.batch_size, out.model.img_size = cfg.batch_size, img_size
    return out


def train_baseline(train_shards: ShardSet, num_classes: int, img_size: int, cfg: BaselineConfig, accelerator,
                   log=print) -> tuple[nn.Module, dict]:
    """Train the ResNet-18 baseline through the trainer's own step (``Trainer.step`` over a plain-PyTorch engine;
    under ``accelerate launch`` the model is DDP-wrapped, so its backward averages gradients over processes).
    Returns (model in eval mode, unwrapped; a record with the loss history)."""
    if cfg.steps < 1:
        raise ValueError(f"baseline steps must be >= 1, got {cfg.steps}")
    torch.manual_seed(cfg.seed)  # same weights on every rank
    trainer = Trainer(trainer_config(cfg, img_size, PRECISION.get(str(accelerator.mixed_precision), "fp32")),
                      detect_env())
    model = accelerator.prepare(resnet18_small(num_classes, cfg.width))
    trainer.engine = PlainEngine(model, trainer.cfg, accelerator.device)
    batches = _labelled(build_train_loader(train_shards.urls, batch_size=cfg.batch_size, img_size=img_size,
                                           seed=cfg.seed, rank=accelerator.process_index,
                                           world_size=accelerator.num_processes, num_workers=cfg.num_workers,
                                           crop_min_scale=cfg.crop_min_scale, interpolation=cfg.interpolation))
    torch.manual_seed(cfg.seed * 1000 + 1 + accelerator.process_index)
    history, start, window = [], time.perf_counter(), Window()
    log_every = max(1, cfg.steps // 10)
    for step in range(cfg.steps):
        out = trainer.step(TrainState(step=step), batches, window)
        history.append(float(out.losses[-1]))
        if (step + 1) % log_every == 0:
            log(f"baseline resnet18: step {step + 1}/{cfg.steps} loss {sum(history[-log_every:]) / log_every:.4f}")
    model = accelerator.unwrap_model(model).eval()
    record = {"config": asdict(cfg), "loss": history, "train_seconds": time.perf_counter() - start}
    return model, record


def _labelled(loader) -> Iterator[dict]:
    for batch in loader:
        if bool((batch["label"] < 0).any()):
            raise ValueError("baseline training needs labelled shards (.cls members)")
        yield batch


def save_baseline(model: nn.Module, record: dict, num_classes: int, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "num_classes": num_classes, "record": record}, path)
    return path


def load_baseline(path: Union[str, Path], device: Optional[torch.device] = None) -> tuple[nn.Module, dict]:
    """A baseline saved by :func:`save_baseline` (eval mode, frozen)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baseline not found: {path}")
    blob = safe_load(path)
    record = blob["record"]
    model = resnet18_small(int(blob["num_classes"]), int(record["config"]["width"]))
    model.load_state_dict(blob["state_dict"])
    model = model.to(device or "cpu").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, record
