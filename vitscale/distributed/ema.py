"""Model EMA (``train.ema_decay``) kept where the weights are: each rank averages, in fp32, only the part of the fp32
master weights it already holds (``engine.fp32_fragments``), so ZeRO-3 never gathers a parameter for it and ZeRO 0-2
run the same code. An update is one fused lerp over local tensors: no communication.

The EMA is saved in every rank's ``rank_NNNNN.pt`` as ``{"ema": {"updates", "parts": {name: (start, numel,
values)}}}``. Loading reads every saved rank's parts and copies the ranges this rank holds now, so a resume at the
same layout, at another world size or at another ZeRO stage (universal conversion) gets the same fp32 values.
Whole parameters exist only where they are needed: validation of the EMA (:meth:`ModelEma.swapped_in`, one gather
per parameter, for the duration of the evaluation) and ``vitscale export --ema`` (:func:`consolidated_ema`, offline).
Parameters that do not train (frozen tables, a frozen encoder) and buffers have no EMA: their own values are used.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator, Optional

import torch

from vitscale.distributed import engine as eng
from vitscale.distributed.safeload import safe_load

RANK_FILE_RE = re.compile(r"^rank_\d{5}\.pt$")


def ema_decay_at(decay: float, step: int, warmup: bool, power: float = 2 / 3) -> float:
    """The decay used at optimizer step ``step`` (1-based), as timm's ``ModelEmaV3.get_decay``: 0 at step 1 (the EMA
    becomes the weights), then ``decay``, or with ``warmup`` ``min(decay, 1 - (1 + (step - 1)) ** -power)`` so that
    early, poor weights are forgotten quickly."""
    t = step - 1
    if t <= 0:
        return 0.0
    return min(decay, 1.0 - (1.0 + t) ** -power) if warmup else decay


class ModelEma:
    """The EMA of this rank's fp32 master fragments. ``decay`` 0 = off: every method is then a no-op."""

    def __init__(self, decay: float = 0.0, warmup: bool = False, every: int = 1):
        self.decay, self.warmup, self.every = decay, warmup, every
        self.updates = 0
        self.values: dict[str, torch.Tensor] = {}  # name -> fp32 EMA of this rank's fragment
        self.where: dict[str, tuple[int, int]] = {}  # name -> (start in the flat parameter, parameter numel)
        self.replicated = True

    @classmethod
    def from_config(cls, cfg) -> "ModelEma":
        return cls(cfg.train.ema_decay, cfg.train.ema_warmup, cfg.train.ema_every)

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    # ----- start, update ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, engine: "eng.Engine", checkpoint: Optional[Path] = None) -> str:
        """Begin from the engine's current weights, or from the EMA saved in ``checkpoint`` (any world size or
        stage) when it has one. Returns a note for the log ("" when off)."""
        if not self.enabled:
            return ""
        fragments, self.replicated = eng.fp32_fragments(engine)
        self.values = {f.name: f.value.detach().float().clone() for f in fragments}
        self.where = {f.name: (f.start, f.numel) for f in fragments}
        self.updates = 0
        if checkpoint is not None and _saved_updates(checkpoint) is not None:
            self.updates = self._load(checkpoint)
            return f"EMA resumed from {checkpoint} ({self.updates} updates)"
        if checkpoint is not None:
            return f"EMA starts from the resumed weights ({checkpoint} has none)"
        return "EMA starts from the initial weights"

    @torch.no_grad()
    def update(self, engine: "eng.Engine", step: int) -> None:
        """After optimizer step ``step`` (1-based): ema <- ema + (1 - d) (w - ema) every ``every`` steps."""
        if not self.enabled or step % self.every:
            return
        d = ema_decay_at(self.decay, step, self.warmup)
        fragments, _ = eng.fp32_fragments(engine)
        ema = [self.values[f.name] for f in fragments if f.value.numel()]
        src = [f.value.float() for f in fragments if f.value.numel()]
        if ema:
            torch._foreach_lerp_(ema, src, 1.0 - d)
        self.updates += 1

    # ----- checkpoint ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What goes into this rank's ``rank_NNNNN.pt`` ({} when off)."""
        if not self.enabled:
            return {}
        parts = {n: (self.where[n][0], self.where[n][1], v.cpu()) for n, v in self.values.items()}
        return {"ema": {"updates": self.updates, "replicated": self.replicated, "parts": parts}}

    def _load(self, checkpoint: Path) -> int:
        """Fill this rank's fragments from every saved rank's parts (one file in memory at a time)."""
        filled = {n: torch.zeros(v.numel(), dtype=torch.bool) for n, v in self.values.items()}
        updates = 0
        for saved in _saved_parts(checkpoint):
            updates = saved["updates"]
            for name, (start, numel, values) in saved["parts"].items():
                if name not in self.values:
                    continue
                if numel != self.where[name][1]:
                    raise ValueError(f"{checkpoint}: the EMA of {name} has {numel} elements, the model "
                                     f"{self.where[name][1]}")
                _copy_overlap(self.values[name], self.where[name][0], values, start, filled[name])
        missing = [n for n, f in filled.items() if not bool(f.all())]
        if missing:
            raise ValueError(f"{checkpoint}: the saved EMA does not cover {', '.join(missing[:4])}")
        return updates

    # ----- evaluation --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped_in(self, engine: "eng.Engine") -> Iterator[None]:
        """The model computes with the EMA weights inside the block (collective: every rank enters). The fp32
        masters and the optimizer are not touched; on exit the weights are rewritten from the masters."""
        if not self.enabled:
            yield
            return
        masters = {f.name: f.value.detach().float().clone() for f in eng.fp32_fragments(engine)[0]}
        _write_whole(engine, self.values, self.where, self.replicated)
        try:
            yield
        finally:
            _write_whole(engine, masters, self.where, self.replicated)


def _copy_overlap(dst: torch.Tensor, dst_start: int, src: torch.Tensor, src_start: int,
                  filled: torch.Tensor) -> None:
    lo, hi = max(dst_start, src_start), min(dst_start + dst.numel(), src_start + src.numel())
    if lo < hi:
        dst[lo - dst_start:hi - dst_start] = src[lo - src_start:hi - src_start].to(dst.device, dst.dtype)
        filled[lo - dst_start:hi - dst_start] = True


@torch.no_grad()
def _write_whole(engine: "eng.Engine", parts: dict[str, torch.Tensor], where: dict[str, tuple[int, int]],
                 replicated: bool) -> None:
    """Write whole parameters assembled from every rank's ``parts``: one all-reduce per parameter (the parts are
    disjoint) unless every rank holds them whole, then ZeRO-3 re-partitions what was written."""
    for name, p in engine.module.named_parameters():
        if name not in where:
            continue
        start, numel = where[name]
        whole = torch.zeros(numel, dtype=torch.float32, device=engine.device)
        part = parts.get(name)
        if part is not None and part.numel():
            whole[start:start + part.numel()] = part.to(whole.device)
        if not replicated and torch.distributed.is_initialized():
            torch.distributed.all_reduce(whole)
        with eng.gathered_params([p], modifier_rank=0):
            p.data.copy_(whole.view(p.shape).to(p.dtype))


def _saved_parts(checkpoint: Path) -> Iterator[dict]:
    for path in sorted(Path(checkpoint).iterdir()):
        if RANK_FILE_RE.match(path.name):
            saved = safe_load(path).get("ema")
            if saved is not None:
                yield saved


def _saved_updates(checkpoint: Path) -> Optional[int]:
    first = Path(checkpoint) / "rank_00000.pt"
    if not first.is_file():
        return None
    saved = safe_load(first).get("ema")
    return None if saved is None else int(saved["updates"])


def consolidated_ema(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Whole fp32 EMA tensors (flat) of a checkpoint, by parameter name, from every rank's saved parts (offline)."""
    whole: dict[str, torch.Tensor] = {}
    for saved in _saved_parts(checkpoint):
        for name, (start, numel, values) in saved["parts"].items():
            buf = whole.setdefault(name, torch.zeros(numel, dtype=torch.float32))
            buf[start:start + values.numel()] = values.float()
    if not whole:
        raise FileNotFoundError(f"{checkpoint} has no EMA (train.ema_decay was 0)")
    return whole
