"""The training step exactly as the trainer runs it, on synthetic or loader batches, for ``bench`` and ``plan``.

Not a copy: :class:`EngineStep` builds a :class:`vitscale.train.Trainer` and calls its ``build_engine`` and
``step``, so a benchmark measures exactly what training runs. One process (or whatever the launcher started):
DeepSpeed's CPU accelerator and gloo on a machine without a GPU. Given a ``model`` (bench's model mode: ours or
timm's), the same ``Trainer.step`` drives it through :class:`vitscale.train.plain.PlainEngine` instead.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Optional

import torch

from vitscale.bench.memory import LiveTensorMemory
from vitscale.config.resolve import DEFAULT_STEPS, DEFAULT_WARMUP_STEPS
from vitscale.config.schema import Config
from vitscale.data.augment import batch_augment_from_config
from vitscale.distributed import engine as eng
from vitscale.distributed.env import detect_env
from vitscale.train import TrainState, Trainer, Window
from vitscale.train.plain import PlainEngine


def synthetic_batch(cfg: Config, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 image batch and labels shaped like the loader's (on the host, as the loader hands them over)."""
    g = torch.Generator().manual_seed(seed)
    B, S = cfg.data.batch_size, cfg.model.img_size
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, max(num_classes, 1), (B,), generator=g)
    return images, labels


class EngineStep:
    """The trainer itself, built for ``cfg``, running its real training step (``Trainer.step``: the same
    normalisation, objective, non-finite check, backward and optimizer step) on the batches it is given."""

    def __init__(self, cfg: Config, num_classes: int, model: Optional[torch.nn.Module] = None,
                 device: Optional[torch.device] = None):
        self.env = detect_env()
        if model is None:
            eng.setup(self.env)
        self.trainer = Trainer(cfg, self.env)
        self.cfg = self.trainer.cfg  # resolved for this launch (the batch derived from data.global_batch_size)
        self.trainer.augment = batch_augment_from_config(self.cfg, num_classes, self.env.rank,  # as Trainer.run does
                                                         self.trainer.objective.classifies)
        if model is None:
            self.trainer.build_engine(num_classes)
        else:  # one process, plain PyTorch: the model alone, through the same step
            self.trainer.engine = PlainEngine(model, self.cfg, device or torch.device("cpu"))
        self.engine = self.trainer.engine
        self.flops_per_image = self.trainer.flops_per_image
        self.params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        # A state a tenth into the schedule: a real, nonzero LR, so AdamW does the training's arithmetic. A recipe in
        # epochs has no step count until the data is read; a step costs the same at any length, so bench takes the
        # default length.
        self.cfg.train.steps = self.cfg.train.steps or DEFAULT_STEPS
        self.cfg.optim.warmup_steps = DEFAULT_WARMUP_STEPS if self.cfg.optim.warmup_steps is None else \
            self.cfg.optim.warmup_steps
        self.state = TrainState(step=self.cfg.train.steps // 10)
        self.window = Window()
        self.engine.train()

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step (``train.grad_accum`` micro-steps, each on this batch), exactly as in training."""
        out = self.trainer.step(self.state, itertools.repeat({"image": images, "label": labels}), self.window)
        return out.losses[-1]


def measure_step_memory(cfg: Config, num_classes: int, steps: int = 3) -> dict[str, Any]:
    """Peak memory of a real training step on this machine (the last of ``steps``, so optimizer states exist).

    GPU: ``torch.cuda.max_memory_allocated``. CPU: live tensor bytes tracked by
    :class:`vitscale.bench.memory.LiveTensorMemory`, entered before the model is built so that parameters,
    DeepSpeed's flat buffers and optimizer states are all counted."""
    if steps < 2:
        raise ValueError("measure at least 2 steps: the first one creates the optimizer states")
    cuda = torch.cuda.is_available()
    tracker: Optional[LiveTensorMemory] = None if cuda else LiveTensorMemory("cpu")
    with tracker if tracker is not None else contextlib.nullcontext():
        runner = EngineStep(cfg, num_classes)
        images, labels = synthetic_batch(runner.cfg, num_classes)
        for i in range(steps):
            if i == steps - 1:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    rest = torch.cuda.memory_allocated()
                else:
                    tracker.reset_peak()
                    rest = tracker.current
            runner.step(images, labels)
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = tracker.peak
    return {"peak_bytes": int(peak), "at_rest_bytes": int(rest), "params": runner.params,
            "method": "torch.cuda.max_memory_allocated" if cuda else "LiveTensorMemory (live tensor storage bytes)",
            "device": str(runner.device)}
