"""Writing the weights file a user names (``vitscale export``): never over something that is not an earlier export,
never half-written.

An export used to overwrite whatever its path named: a run's own checkpoint shard or config.yaml were replaced by
the weights file, and the checkpoint was lost. Now a path that exists must hold a safetensors file (re-exporting
replaces it) and is checked before minutes of consolidation; the file is written beside it and renamed into place,
so a kill mid-write leaves the previous export whole.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def is_safetensors(path: Path) -> bool:
    """Whether PATH starts as a safetensors file does: an 8-byte little-endian header length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return 0 < size <= MAX_HEADER and head[8:9] == b"{" and Path(path).stat().st_size >= 8 + size


def check_weights_path(out: Path) -> None:
    """Refuse, in one line, an output path the weights must not replace: a folder, or a file that is not a
    safetensors file (a checkpoint shard, a config)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder: give the weights file's path (e.g. {out / 'model.safetensors'})")
    if out.exists() and not is_safetensors(out):
        raise ValueError(f"{out} exists and is not a safetensors file: not overwriting it (choose another path)")


def check_folder_path(out_dir: Path, what: str = "") -> None:
    """Refuse, in one line and before any work, an output folder that is a file or lies under one (mkdir would
    raise FileExistsError after minutes of work). An existing folder is fine: writing into it again replaces
    what an earlier run wrote. ``what``: how the command names it (e.g. ``--out``)."""
    out = Path(out_dir)
    name = f"{what} {out}" if what else str(out)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{name} exists and is not a folder" if p == out else
                                 f"{name}: {p} is a file, not a folder")
            return


def save_weights(sd: dict[str, torch.Tensor], out: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """Write SD to OUT (checked as :func:`check_weights_path` does) through a file beside it renamed into place."""
    out = Path(out)
    check_weights_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(sd, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
