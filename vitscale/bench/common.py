"""Helpers shared by ``bench``, ``plan`` and the engine-step runner: classes, devices, formatting, JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from vitscale.config.schema import Config
from vitscale.data.demo import num_classes as demo_num_classes

GB = 2 ** 30  # every "GB" printed by these tools is 2^30 bytes, like torch.cuda memory figures


def resolve_num_classes(cfg: Config, override: Optional[int] = None) -> tuple[int, str]:
    """Classes of the supervised head, without building or reading any shard data when possible.

    Order: ``override``, ``data.num_classes``, the demo data set's known count, the manifest next to a local
    ``train_shards`` path, else 1000 (ImageNet). Returns (classes, where the number came from)."""
    if override:
        return int(override), "--num-classes"
    if cfg.data.num_classes:
        return cfg.data.num_classes, "data.num_classes"
    spec = cfg.data.train_shards
    if spec.startswith("demo:"):
        name = spec.split(":")[1]
        if demo_num_classes(name):
            return demo_num_classes(name), f"demo data {name}"
    p = Path(spec)
    manifest = p if p.name == "manifest.json" else p / "manifest.json"
    if manifest.is_file():
        try:
            n = json.loads(manifest.read_text()).get("num_classes")
            if n:
                return int(n), str(manifest)
        except (OSError, ValueError):
            pass
    return 1000, "assumed (ImageNet-1k)"


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """Mixed-precision compute dtype of a config's ``train.precision`` (None for fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def bench_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    return dev


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings cover it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt_gb(nbytes: Optional[float], digits: int = 2) -> str:
    if nbytes is None:
        return "n/a"
    gb = nbytes / GB
    if 0 < gb < 10 ** (1 - digits):
        return f"{gb:.{digits}g}"  # small CPU models: significant digits, not 0.00
    return f"{gb:.{digits}f}"


def fmt_num(value: Optional[float], spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def print_table(headers: list[str], rows: list[list[str]], align_left: int = 1) -> None:
    """Plain fixed-width table (first ``align_left`` columns left-aligned, the rest right-aligned)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i < align_left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
