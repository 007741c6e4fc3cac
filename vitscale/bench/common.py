"""Helpers shared by ``bench``, ``plan`` and the engine-step runner: classes, devices, formatting, JSON."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from vitscale.config.schema import Config
from vitscale.config.sources import parse_sources
from vitscale.data.mix import resolve_train_set, shard_sets
from vitscale.data.shards import described, head_classes

GB = 2 ** 30  # every "GB" printed by these tools is 2^30 bytes, like torch.cuda memory figures


def resolve_num_classes(cfg: Config, override: Optional[int] = None, read_shards: bool = False) -> tuple[int, str]:
    """Classes of the supervised head by the trainer's rule (:func:`vitscale.data.shards.head_classes`), for a bench
    or a plan: ``override`` (``--num-classes``) first; the shards' manifest as the trainer reads it when
    ``read_shards`` (the bench reads them anyway), else only what is known without building or reading shard data;
    1000 (ImageNet) when nothing says. Returns (classes, where the number came from)."""
    if override:
        return int(override), "--num-classes"
    spec = cfg.data.train_shards
    if read_shards:
        sets = shard_sets(resolve_train_set(spec, cfg.data.cache_dir))
    else:  # a mix: each source's manifest, the first that tells (as head_classes reads them)
        sets = [described(s.spec) for s in parse_sources(spec) or []] or [described(spec)]
    classes, source = head_classes(cfg.data.num_classes, *sets)
    return (classes, source) if classes else (1000, "assumed (ImageNet-1k)")


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


def bytes_under(path: Path) -> int:
    """Bytes of the files under ``path`` now (0 if it is gone), counted while something may still be writing or
    removing there: os.walk skips a folder that vanishes mid-walk, where pathlib's rglob raises."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file renamed or removed while we count
                total += os.path.getsize(os.path.join(folder, name))
    return total


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
