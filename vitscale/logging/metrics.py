"""metrics.jsonl: one JSON object per log step, written by rank 0 only."""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

import torch


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null keeps the line parseable
    return value


class MetricsWriter:
    def __init__(self, path: Optional[Path]):
        self.path = path
        self._f = open(path, "a", buffering=1) if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# Metric names older runs wrote -> today's: the one place old results are translated (read_metrics, and the sweep's
# reading of eval result files through current_name), so nothing else knows the old names.
RENAMED = {"val_acc": "val_top1", "train_acc": "train_top1"}


def current_name(key: str) -> str:
    """Today's name of a metric key (also as the last part of ``linear/val_acc``)."""
    head, sep, leaf = key.rpartition("/")
    return head + sep + RENAMED.get(leaf, leaf)


def read_metrics(path: Path, strict: bool = True) -> list[dict]:
    """A run's ``metrics.jsonl`` records in order, keys under today's names (:data:`RENAMED`): the one reader (plot,
    sweep tables, tests). ``strict``: a line that is not a JSON object is a ValueError naming ``path:line``; else it
    is skipped (the last line of a run killed while writing it). Lines are decoded one by one, so a damaged byte
    costs its line, not the file (and an error names ``path:line``, not just the codec)."""
    records = []
    for i, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested deeper than Python's stack
            record = None
        if not isinstance(record, dict):
            if strict:
                raise ValueError(f"{path}:{i} is not valid JSON")
            continue
        records.append({current_name(k): v for k, v in record.items()})
    return records


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}``: the project's one spread convention (sweep tables, few-shot seeds): the sample
    standard deviation (n - 1 in the denominator) over the n values, 0.0 for one value; n always stated."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std: no values")
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def peak_memory_gb() -> float:
    """Peak accelerator memory if on GPU, else peak resident memory of this process."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if os.uname().sysname != "Darwin" else kb / 2**30


# Dense bf16 peak FLOP/s per GPU (no sparsity), the most specific name first (an "H100 PCIe" is not an SXM H100);
# MFU is reported only where the peak is known, and against the bf16 peak whatever train.precision is (nanoGPT's
# convention), so an fp32 run's MFU reads low.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "A100": 312e12, "H100": 989e12, "H200": 989e12}


def device_peak_flops(override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of this process's GPU for MFU: the override (logging.peak_tflops) if given, else the table;
    None (MFU not reported) on CPU or an unknown GPU."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None
