"""Periodic validation during training (``train.eval_every``): top-1, top-5 and loss on ``data.val_shards``,
written to metrics.jsonl and wandb, and ``checkpoints/best`` pointing at the checkpoint with the best top-1
(``train.best_metric``: the weights' ``val_top1``, or ``val_top1_ema`` of the model EMA, which is validated too).

Every rank reads a disjoint part of the held-out shards (sample i goes to rank i % world size) and the counts and
summed losses are added over ranks, so 2 processes report what 1 process does. Under ZeRO-3 a forward pass
gathers parameters collectively, so a rank that ran out of batches keeps stepping with a dummy one until every
rank is done (one small all-reduce per batch agrees on that). :func:`held_out_sums` is that loop; the end-of-run
evaluation (the objective's ``eval_sums``) uses it too.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from vitscale import faults
from vitscale.data.evaluation import build_eval_loader
from vitscale.data.transforms import EvalTransform
from vitscale.logging.metrics import read_metrics
from vitscale.pixels import normalize
from vitscale.distributed import engine as eng
from vitscale.objectives.supervised import CLASSIFIER_SUMS, classifier_sums

BEST = "best"  # checkpoints/best: the tag of the best checkpoint so far (as checkpoints/latest)
BEST_INFO = "best.json"  # its step and numbers


def eval_view(cfg: Any) -> EvalTransform:
    """The run's eval transform (data.eval_crop_pct, data.interpolation)."""
    return EvalTransform(cfg.data.eval_crop_pct, cfg.data.interpolation)


@torch.no_grad()
def held_out_sums(engine: Any, urls: list[str], batch_size: int, img_size: int, rank: int, world_size: int,
                  sums_of: Callable[[Any, torch.Tensor, torch.Tensor], dict], keys: Sequence[str],
                  view: EvalTransform = EvalTransform(), label_key: str = "cls") -> tuple[dict[str, float], int]:
    """``({key: sum over every held-out image}, images)``, the same on every rank: ``sums_of(engine, images,
    labels)`` gives each batch's sums. A rank out of batches runs ``sums_of`` on a dummy image (and discards it)
    while another rank still has some: under ZeRO-3 each forward gathers parameters collectively."""
    loader = iter(build_eval_loader(urls, batch_size=batch_size, img_size=img_size, rank=rank,
                                    world_size=world_size, view=view, label_key=label_key))
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64)  # the keys, then the image count
    dummy = (torch.zeros(1, 3, img_size, img_size, device=engine.device, dtype=engine.dtype),
             torch.zeros(1, dtype=torch.int64, device=engine.device))  # for a rank that gets no batch at all
    engine.eval()
    try:
        while True:
            batch = next(loader, None)
            if eng.all_reduce_sum([0.0 if batch is None else 1.0])[0] == 0:
                break
            if batch is None:  # this rank is done but another is not: keep the collective forward passes in step
                sums_of(engine, *dummy)
                continue
            images = normalize(batch["image"], engine.device).to(engine.dtype)
            labels = batch["label"].to(engine.device)
            dummy = (images[:1], labels[:1])
            got = sums_of(engine, images, labels)
            sums += torch.tensor([float(got[k]) for k in keys] + [len(labels)], dtype=torch.float64)
    finally:
        engine.train()
    *totals, count = eng.all_reduce_sum(sums.tolist())
    return dict(zip(keys, totals)), int(count)


def validate(engine: Any, urls: list[str], batch_size: int, img_size: int, rank: int, world_size: int,
             view: EvalTransform = EvalTransform(), label_key: str = "cls") -> dict:
    """``{val_top1, val_top5, val_loss, val_images}`` over every held-out sample, the same on every rank."""
    sums, count = held_out_sums(engine, urls, batch_size, img_size, rank, world_size, classifier_sums,
                                CLASSIFIER_SUMS, view, label_key)
    return {**{f"val_{k}": v / max(count, 1) for k, v in sums.items()}, "val_images": count}


class PeriodicValidation:
    """What the loop calls: ``due`` -> ``run`` (True on a new best top-1, which needs a checkpoint) -> after the
    checkpoint is written, ``saved`` moves ``checkpoints/best`` to it."""

    def __init__(self, cfg: Any, val_urls: Optional[list[str]], rank: int, world_size: int, ckpt_dir: Path,
                 write: Callable[[dict], None], log: Callable[[str], None] = print, classifier: bool = True):
        self.cfg, self.urls, self.rank, self.world_size = cfg, val_urls, rank, world_size
        self.classifier = classifier  # top-1/top-5 need a classifier (Objective.classifies)
        self.dir, self.write, self.log = Path(ckpt_dir), write, log
        self.pending: Optional[dict] = None
        self.last: Optional[dict] = None  # the latest record: the end of the run reuses it when it is of that step
        self.metric = cfg.train.best_metric
        self.best = read_best(self.dir / BEST_INFO, self.metric, self.log)

    def due(self, step: int, last: bool) -> bool:
        every = self.cfg.train.eval_every
        return bool(every and self.urls and self.classifier and (step % every == 0 or last))

    def run(self, engine: Any, step: int, ema: Any = None) -> bool:
        """Validate (and the model EMA ``ema``, when enabled: val_*_ema), log, and say whether this step is a new best
        by ``train.best_metric`` (then it must be checkpointed)."""
        args = (self.urls, self.cfg.data.batch_size, self.cfg.model.img_size, self.rank, self.world_size,
                eval_view(self.cfg), self.cfg.data.label_key)
        record = validate(engine, *args)
        line = f"val top-1 {100 * record['val_top1']:.2f}%, top-5 {100 * record['val_top5']:.2f}%, " \
               f"loss {record['val_loss']:.4f}"
        if ema is not None and ema.enabled:
            with ema.swapped_in(engine):
                record.update({f"{k}_ema": v for k, v in validate(engine, *args).items() if k != "val_images"})
            line += f"; EMA top-1 {100 * record['val_top1_ema']:.2f}%"
        self.write({"step": step, **record})
        self.last = {"step": step, **record}
        self.log(f"step {step}: {line}")
        if record[self.metric] <= self.best:
            return False
        self.best, self.pending = record[self.metric], {"step": step, **record}
        return True

    def final(self, engine: Any, step: int, objective: Any, write: Callable[[dict], None]) -> dict:
        """The finished model's held-out figures, ``val_images`` and ``val_<key>`` of the objective's ``eval_keys``:
        periodic validation's record when it measured this very step (same weights, same images: evaluating again
        would only repeat its line in metrics.jsonl), else the objective's per-batch sums over every rank's share,
        given to ``write`` (metrics.jsonl only: the tracker gets the figures as the run's summary)."""
        done = self.last
        if done is not None and done["step"] == step and all(f"val_{k}" in done for k in objective.eval_keys):
            return {k: v for k, v in done.items() if k != "step"}
        faults.inject("final_eval", rank=self.rank, step=step)
        data = self.cfg.data
        sums, count = held_out_sums(engine, self.urls, data.batch_size, self.cfg.model.img_size, self.rank,
                                    self.world_size, objective.eval_sums, objective.eval_keys, eval_view(self.cfg),
                                    data.label_key)
        record = {"val_images": count, **{f"val_{k}": v / max(count, 1) for k, v in sums.items()}}
        write({"step": step, **record})
        return record

    def saved(self, tag: str, step: int) -> None:
        """The checkpoint ``tag`` of ``step`` is complete: point ``best`` at it if it is the pending best."""
        if self.pending is None or self.pending["step"] != step:
            return
        if self.rank == 0:
            _write_atomic(self.dir / BEST_INFO, json.dumps({"tag": tag, **self.pending}))
            _write_atomic(self.dir / BEST, tag + "\n")
        self.pending = None


def read_best(path: Path, metric: str, warn: Callable[[str], None]) -> float:
    """The best ``metric`` that ``best.json`` records, or -1.0 (none yet). A damaged file (cut short by a full disk,
    edited by hand, copied from elsewhere) must not stop a resume: it is warned about, naming it, and counts as no
    best, so the next validation records a new one."""
    if not path.is_file():
        return -1.0
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSON errors are ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else f"unreadable ({type(e).__name__}: {e})"
    else:
        if not isinstance(record, dict):
            why = f"not a JSON object but {type(record).__name__}"
        elif metric not in record:
            return -1.0  # e.g. train.best_metric changed to val_top1_ema: nothing of it recorded yet
        else:
            value = record[metric]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
            why = f"{metric} is {str(value)[:40]!r}, not a finite number"
    warn(f"warning: {path}: {why[:200]}; ignoring it (the next validation records a new best)")
    return -1.0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # else a crash soon after the rename may leave an empty file under the new name
    os.replace(tmp, path)


def final_figures_recorded(run_dir: Path, step: int, objective: Any) -> bool:
    """Whether the run's metrics.jsonl holds the held-out figures of STEP (every ``val_<key>`` of the objective's
    ``eval_keys``): a launch killed during the end-of-run evaluation (a time limit, an out-of-memory kill) has
    written its last checkpoint without them."""
    path = Path(run_dir) / "metrics.jsonl"
    return path.is_file() and any(r.get("step") == step and all(f"val_{k}" in r for k in objective.eval_keys)
                                  for r in read_metrics(path, strict=False))
