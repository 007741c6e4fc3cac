"""Writing WebDataset tar shards and their ``manifest.json``.

A shard directory holds ``{prefix}-000000.tar, {prefix}-000001.tar, ...`` and one ``manifest.json`` (one prefix
per directory). Each sample is two tar members: ``<key>.<ext>`` (png/jpg/jpeg/webp bytes) and ``<key>.cls``
(the label as an ascii integer; omitted when there is no label). Shards are plain POSIX (ustar) tar files, so
``tar tf`` lists them and any WebDataset reader can read them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable, Optional

from vitscale.data.tario import IMAGE_EXTS

MANIFEST = "manifest.json"
FORMAT = "vitscale-shards"


# ----- writing -------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # byte-identical shards from identical input
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def check_key(key: str) -> None:
    """Keys become tar member names ``<key>.<ext>``; WebDataset groups members by the text before the first dot."""
    if not key or "." in key or "/" in key or "\\" in key or key.startswith("__"):
        raise ValueError(f"invalid sample key {key!r}: must be non-empty, without '.', '/' or a leading '__'")


class _ShardWriter:
    """Writes one shard at a time to a temporary name and renames it into place once complete."""

    def __init__(self, out_dir: Path, prefix: str, maxcount: int, maxsize: Optional[int], start_index: int = 0):
        self.out_dir, self.prefix, self.maxcount, self.maxsize = out_dir, prefix, maxcount, maxsize
        self.index = start_index
        self.shards: list[dict] = []
        self.tar: Optional[tarfile.TarFile] = None
        self.count = self.size = 0
        self.keys: set[str] = set()

    def _open(self) -> None:
        self.name = f"{self.prefix}-{self.index:06d}.tar"
        self.tmp = self.out_dir / f".{self.name}.tmp-{os.getpid()}"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = self.size = 0
        self.keys = set()

    def close_shard(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        final = self.out_dir / self.name
        os.replace(self.tmp, final)
        self.shards.append({"name": self.name, "count": self.count, "bytes": final.stat().st_size,
                            "sha256": _sha256(final)})
        self.tar = None
        self.index += 1

    def write(self, key: str, data: bytes, ext: str, label: Optional[int]) -> None:
        check_key(key)
        ext = ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"sample {key!r}: image extension {ext!r} is not one of {', '.join(IMAGE_EXTS)}")
        size = len(data) + 1536  # two headers + padding, roughly
        if self.tar is not None and (self.count >= self.maxcount or
                                     (self.maxsize and self.count and self.size + size > self.maxsize)):
            self.close_shard()
        if self.tar is None:
            self._open()
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self.name}")
        self.keys.add(key)
        _add_member(self.tar, f"{key}.{ext}", bytes(data))
        if label is not None:
            _add_member(self.tar, f"{key}.cls", str(int(label)).encode("ascii"))
        self.count += 1
        self.size += size

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tmp.unlink(missing_ok=True)
            self.tar = None


def label_summary(labels: Iterable[Optional[int]]) -> dict:
    """The manifest's ``labels`` entry: smallest and largest label and how many samples have none (the trainer
    refuses, before training, a supervised run these show it cannot do)."""
    labels = list(labels)
    present = [int(x) for x in labels if x is not None]
    return {"min": min(present, default=None), "max": max(present, default=None), "missing": len(labels) - len(present)}


def build_manifest(prefix: str, shards: list[dict], class_names: Optional[list[str]],
                   max_label: Optional[int], **extra) -> dict:
    if class_names is not None:
        num_classes: Optional[int] = len(class_names)
    else:
        num_classes = None if max_label is None else max_label + 1
    return {"format": FORMAT, "version": 1, "prefix": prefix, "num_samples": sum(s["count"] for s in shards),
            "num_classes": num_classes, "class_names": list(class_names) if class_names is not None else None,
            **extra, "shards": shards}


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def write_shards(samples: Iterable[tuple[str, bytes, str, Optional[int]]], out_dir, prefix: str = "train",
                 maxcount: int = 1000, *, maxsize: Optional[int] = None,
                 class_names: Optional[list[str]] = None) -> dict:
    """Write ``(key, image_bytes, ext, label_or_None)`` samples as tar shards plus ``out_dir/manifest.json``.

    A new shard starts after ``maxcount`` samples (or before ``maxsize`` bytes would be exceeded). Returns the
    manifest (``prefix, num_samples, num_classes, class_names, shards=[{name, count, bytes, sha256}]``) with
    ``path`` set to the manifest file. ``num_classes`` is ``len(class_names)`` or else max label + 1.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    old = out / MANIFEST
    if old.exists():
        try:
            old_prefix = json.loads(old.read_text()).get("prefix")
        except (OSError, ValueError):
            old_prefix = None
        if old_prefix not in (None, prefix):
            raise ValueError(f"{out} already holds '{old_prefix}' shards (one prefix per directory): "
                             f"write '{prefix}' shards to another directory")
    writer = _ShardWriter(out, prefix, maxcount, maxsize)
    labels: list = []
    try:
        for key, data, ext, label in samples:
            writer.write(key, data, ext, label)
            labels.append(label)
        writer.close_shard()
    except BaseException:
        writer.abort()
        raise
    summary = label_summary(labels)
    manifest = build_manifest(prefix, writer.shards, class_names, summary["max"], labels=summary)
    path = write_manifest(out, manifest)
    return {**manifest, "path": str(path)}
