"""`vitscale make-shards SRC OUT`: an image folder / CSV / JSONL list -> tar shards + manifest.json.

Sources:
  * an ImageFolder tree ``SRC/<class>/<...>/image.jpg`` (labels = sorted class folder names),
  * a flat folder of images (no labels),
  * a ``.csv`` (``path,label`` rows, optional header) or ``.jsonl`` (``{"path": ..., "label": ...}``) list;
    paths are relative to the list file, labels are ints or class names (mapped in sorted order).

Images are read in parallel (``workers`` processes) in a fixed order, so the output is deterministic. Unreadable
images are skipped and listed in ``OUT/skipped.txt``. PNG/JPEG/WebP bytes are stored as they are; other formats
are re-encoded as PNG; ``resize=N`` scales the shorter side down to N and re-encodes as JPEG (quality 90).
The images are shuffled globally before they are written (seeded: ``--seed``, recorded in ``manifest.json``), so
class folders do not become one-class shards; ``--no-shuffle`` keeps the source order. 16-bit and other modes PNG,
JPEG and WebP cannot carry for training are re-encoded as 8-bit RGB PNG.
An interrupted conversion is resumed: ``OUT/.progress.json`` records the complete shards, which are kept.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import re
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps

from vitscale.data.transforms import _pil_rgb
from vitscale.data.writer import MANIFEST, _ShardWriter, build_manifest, label_summary, write_manifest
from vitscale.errors import VitscaleError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
PROGRESS = ".progress.json"
SKIPPED = "skipped.txt"


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _list_folder(src: Path) -> tuple[list[tuple[str, Optional[int]]], Optional[list[str]]]:
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {c: sorted(str(p) for p in (src / c).rglob("*") if _is_image(p)) for c in classes}
    per_class = {c: v for c, v in per_class.items() if v}
    if per_class:
        names = sorted(per_class)
        return [(p, i) for i, c in enumerate(names) for p in per_class[c]], names
    flat = sorted(str(p) for p in src.iterdir() if _is_image(p))
    return [(p, None) for p in flat], None


def _labels(raw: list) -> tuple[list[Optional[int]], Optional[list[str]]]:
    present = [r for r in raw if r not in (None, "")]
    if all(isinstance(r, int) or (isinstance(r, str) and re.fullmatch(r"-?\d+", r.strip())) for r in present):
        return [None if r in (None, "") else int(r) for r in raw], None
    names = sorted({str(r) for r in present})
    index = {n: i for i, n in enumerate(names)}
    return [None if r in (None, "") else index[str(r)] for r in raw], names


def _list_file(src: Path) -> tuple[list[tuple[str, Optional[int]]], Optional[list[str]]]:
    paths, raw = [], []
    raw_bytes = src.read_bytes()
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as e:  # the codec's own message names no file
        raise ValueError(f"{src} is not UTF-8 text (byte 0x{raw_bytes[e.start]:02x} at position {e.start})") from None
    if src.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    if not isinstance(row["path"], str):  # {"path": 5} failed later as a TypeError
                        raise TypeError
                    paths.append(row["path"])
                except (ValueError, KeyError, TypeError, IndexError, RecursionError):
                    raise ValueError(f"{src}:{n}: expected a JSON object with 'path' (and 'label')") from None
                raw.append(row.get("label"))
    else:
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r and any(c.strip() for c in r)]
        if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
            rows = rows[1:]
        for r in rows:
            paths.append(r[0].strip())
            raw.append(r[1].strip() if len(r) > 1 else None)
    labels, names = _labels(raw)
    base = src.parent
    return [(str(p if os.path.isabs(p) else base / p), lab) for p, lab in zip(paths, labels)], names


def list_source(src) -> tuple[list[tuple[str, Optional[int]]], Optional[list[str]]]:
    """``([(image path, label or None)], class names or None)`` in the fixed order shards are written."""
    src = Path(src)
    if src.is_dir():
        return _list_folder(src)
    if src.is_file() and src.suffix.lower() in (".csv", ".jsonl", ".txt"):
        return _list_file(src)
    if not src.exists():
        raise FileNotFoundError(f"make-shards: no such file or directory: {src}")
    raise ValueError(f"make-shards: {src} is neither a folder nor a .csv/.jsonl list")


def _reencode_png(im) -> bytes:
    """An image PNG/JPEG/WebP cannot hold as is for training (16-bit, CMYK, ...) -> 8-bit RGB PNG."""
    buf = io.BytesIO()
    Image.fromarray(_pil_rgb(im)).save(buf, format="PNG")
    return buf.getvalue()


def _encode(path: str, resize: Optional[int]) -> tuple[bytes, str]:
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        fmt = (im.format or "").upper()
        im.load()  # fully decode: catches truncated files
        if resize:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            w, h = rgb.size
            if min(w, h) > resize:
                s = resize / min(w, h)
                rgb = rgb.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=90)
            return buf.getvalue(), "jpg"
        deep = im.mode.startswith(("I", "F")) or (fmt == "PNG" and len(data) > 24 and data[24] > 8)
        if fmt in ("JPEG", "PNG", "WEBP") and not deep:
            return data, {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        return _reencode_png(im), "png"


def _process(job):
    i, path, resize = job
    try:
        data, ext = _encode(path, resize)
        return i, data, ext, None
    except Exception as e:
        return i, None, None, f"{type(e).__name__}: {e}"


def _key(i: int, path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem)[:48]
    return f"{i:09d}_{stem}" if stem else f"{i:09d}"


def _fingerprint(items, params) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for p, lab in items:
        h.update(f"{p}\t{lab}\n".encode())
    return h.hexdigest()


def _ours(out: Path, prefix: str) -> list[Path]:
    return [p for p in out.iterdir() if p.name in (MANIFEST, PROGRESS, SKIPPED)
            or re.fullmatch(rf"\.?{re.escape(prefix)}-\d{{6}}\.tar(\.tmp-\d+)?", p.name)]


class OutputNotEmpty(VitscaleError, FileExistsError):
    """make-shards' OUT already holds something it would overwrite."""


def _list_items(src, shuffle: bool, seed: int) -> tuple[list, Optional[list[str]]]:
    """The images in the order they are written: shuffled globally (seeded) unless ``shuffle`` is off, so an
    ImageFolder tree does not become shards holding one class each."""
    items, class_names = list_source(src)
    if not items:
        raise ValueError(f"make-shards: no images found in {src}")
    # a list naming no file that exists (e.g. a text file that is no image list) would write 0 images: stop here,
    # before OUT is touched; any() stops at the first file found, so a good list costs one stat
    if not Path(src).is_dir() and not any(os.path.isfile(p) for p, _ in items):
        raise ValueError(f"make-shards: every image listed in {src} is missing ({len(items)} listed, "
                         f"e.g. {items[0][0]})")
    if shuffle:
        random.Random(seed).shuffle(items)
    return items, class_names


def _prepare_out(out: Path, prefix: str, overwrite: bool, fingerprint: str) -> tuple[list, int, list]:
    """(complete shards kept, next image, skipped so far) of an interrupted conversion into ``out``, after
    clearing it for ``overwrite``; a one-line error for an OUT holding anything else."""
    progress_path = out / PROGRESS
    if not (out.exists() and any(out.iterdir())):
        out.mkdir(parents=True, exist_ok=True)
        return [], 0, []
    if overwrite:
        for p in _ours(out, prefix):
            p.unlink()
        return [], 0, []
    prog = None
    if progress_path.is_file():
        try:
            prog = json.loads(progress_path.read_text())
        except ValueError:
            prog = None
    if prog is not None and prog.get("fingerprint") == fingerprint:
        for p in out.glob(f".{prefix}-*.tar.tmp-*"):  # partial shard of the interrupted run
            p.unlink()
        print(f"make-shards: resuming: {len(prog['shards'])} complete shard(s) kept, from image {prog['next_item']}")
        return prog["shards"], prog["next_item"], prog["skipped"]
    if (out / MANIFEST).is_file() and not progress_path.exists():
        raise OutputNotEmpty(f"make-shards: {out} already holds shards; pass --overwrite to replace them")
    raise OutputNotEmpty(f"make-shards: {out} is not empty (or holds another conversion); pass --overwrite or "
                         f"choose an empty directory")


class _Progress:
    """Records each completed shard in ``OUT/.progress.json``, so an interrupted conversion resumes there."""

    def __init__(self, writer: _ShardWriter, path: Path, fingerprint: str, params: dict, skipped: list):
        self.writer, self.path, self.skipped = writer, path, skipped
        self.head = {"fingerprint": fingerprint, "params": params}
        self.close = writer.close_shard
        writer.close_shard = self.close_and_record

    def close_and_record(self) -> None:
        w = self.writer
        had = w.tar is not None
        self.close()
        if had:
            prog = {**self.head, "shards": w.shards, "next_item": w.next_item,
                    "skipped": [s for s in self.skipped if s[0] < w.next_item]}
            tmp = self.path.with_name(PROGRESS + ".tmp")
            tmp.write_text(json.dumps(prog))
            os.replace(tmp, self.path)


def _write_images(writer: _ShardWriter, items: list, start: int, resize: Optional[int], workers: Optional[int],
                  skipped: list) -> None:
    """Encode images ``start..`` in parallel (results in order) and write them; unreadable ones are listed."""
    jobs = [(i, items[i][0], resize) for i in range(start, len(items))]
    nproc = workers or os.cpu_count() or 1
    pool = mp.get_context("spawn").Pool(nproc) if nproc > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(_process, jobs, chunksize=16) if pool else map(_process, jobs)
        for i, data, ext, err in results:
            if err is not None:
                skipped.append([i, items[i][0], err])
                continue
            writer.next_item = i
            writer.write(_key(i, items[i][0]), data, ext, items[i][1])
        writer.next_item = len(items)
        writer.close_shard()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()


def _none_readable(src, out: Path, created: bool, skipped: list) -> None:
    """Not one image could be read: a one-line error instead of an empty manifest, and OUT as it was before (the
    progress file cleared, the folder removed if this call made it and it is empty)."""
    (out / PROGRESS).unlink(missing_ok=True)
    if created and not any(out.iterdir()):
        out.rmdir()
    first = f" (e.g. {skipped[0][1]}: {skipped[0][2]})" if skipped else ""
    raise ValueError(f"make-shards: none of the {len(skipped)} image(s) of {src} could be read{first}; nothing "
                     f"written")


def make_shards(src, out, *, maxcount: int = 1000, maxsize: Optional[int] = None, resize: Optional[int] = None,
                prefix: str = "train", overwrite: bool = False, workers: Optional[int] = None, shuffle: bool = True,
                seed: int = 0) -> dict:
    """Convert ``src`` to shards in ``out``; returns the manifest (plus ``path`` and ``skipped``). The images are
    shuffled globally with ``seed`` (recorded in the manifest) unless ``shuffle`` is False (source order)."""
    items, class_names = _list_items(src, shuffle, seed)
    out = Path(out)
    params = {"src": str(Path(src).resolve()), "maxcount": maxcount, "maxsize": maxsize, "resize": resize,
              "prefix": prefix, "items": len(items), "shuffle": shuffle, "seed": seed}
    fingerprint = _fingerprint(items, params)
    created = not out.exists()
    done_shards, start, skipped = _prepare_out(out, prefix, overwrite, fingerprint)
    writer = _ShardWriter(out, prefix, maxcount, maxsize, start_index=len(done_shards))
    writer.shards = list(done_shards)
    writer.next_item = start
    _Progress(writer, out / PROGRESS, fingerprint, params, skipped)
    _write_images(writer, items, start, resize, workers, skipped)
    if not writer.shards:
        _none_readable(src, out, created, skipped)
    bad = {i for i, _, _ in skipped}
    labels = label_summary(lab for i, (_, lab) in enumerate(items) if i not in bad)
    manifest = build_manifest(prefix, writer.shards, class_names, labels["max"], labels=labels,
                              order={"shuffled": shuffle, "seed": seed if shuffle else None})
    path = write_manifest(out, manifest)
    if skipped:
        (out / SKIPPED).write_text("".join(f"{p}\t{e}\n" for _, p, e in skipped))
        print(f"make-shards: skipped {len(skipped)} unreadable image(s), listed in {out / SKIPPED}")
    (out / PROGRESS).unlink(missing_ok=True)
    print(f"make-shards: wrote {manifest['num_samples']} images in {len(writer.shards)} shard(s) to {out}"
          f"{' (shuffled, seed %d)' % seed if shuffle else ' (source order)'}")
    return {**manifest, "path": str(path), "skipped": [p for _, p, _ in skipped]}
