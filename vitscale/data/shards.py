"""Resolving a shard spec (demo name, brace pattern, manifest, url list, single tar) to a list of urls.

Shards are written by :mod:`vitscale.data.writer` (the format is described there) or by any WebDataset tool.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import braceexpand

from vitscale.data.demo import ensure_demo_shards, num_classes as demo_num_classes
from vitscale.data.tario import label_ext
from vitscale.data.writer import MANIFEST

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_URLS = 1_000_000  # a brace pattern expanding to more is a typo (or a bomb), not a data set
_RANGE = re.compile(r"\{(-?\d+|[a-zA-Z])\.\.(-?\d+|[a-zA-Z])(?:\.\.(-?\d+))?\}")
_CHOICES = re.compile(r"\{([^{}]*,[^{}]*)\}")


@dataclass
class ShardSet:
    """What a shard spec resolves to. Counts and classes are ``None`` when no manifest describes the shards."""

    urls: list[str]
    num_samples: Optional[int] = None
    num_classes: Optional[int] = None
    class_names: Optional[list[str]] = None
    labels: Optional[dict] = None  # manifest's label summary: {"min", "max", "missing"} (make-shards writes it)


def check_labels(shard_sets: Union[ShardSet, Sequence[Optional[ShardSet]]], num_classes: int,
                 label_key: str = "cls") -> None:
    """Before training: a one-line error for a bad ``data.label_key``, or when a manifest already shows labels a
    supervised run (``num_classes`` > 0) cannot use (train or val shards). Without a manifest, the training
    loader skips and counts such samples."""
    label_ext(label_key)
    for shard_set in [shard_sets] if isinstance(shard_sets, ShardSet) else shard_sets:
        info = (shard_set.labels if shard_set is not None else None) or {}
        if not num_classes or not info or label_key != "cls":  # the manifest describes the .cls members
            continue
        lo, hi, missing = info.get("min"), info.get("max"), int(info.get("missing") or 0)
        if missing:
            raise ValueError(f"the shard manifest of {shard_set.urls[0]}... lists {missing} sample(s) without a "
                             f"label; a supervised run needs one per sample (drop them, or train objective.name=mae)")
        if lo is not None and hi is not None and not (0 <= lo and hi < num_classes):
            raise ValueError(f"the shard manifest has labels {lo}..{hi} but data.num_classes={num_classes} "
                             f"allows 0..{num_classes - 1}")


def head_classes(configured: Optional[int], *sets: Optional[ShardSet]) -> tuple[int, str]:
    """The classes of a classifier head: the one rule train, bench, plan and eval follow. ``data.num_classes``
    when set, else the first of ``sets`` whose manifest lists classes; (0, "unknown") when none says.
    Returns (classes, where the number came from)."""
    if configured:
        return int(configured), "data.num_classes"
    for s in sets:
        if s is not None and s.num_classes:
            if not hasattr(s, "urls"):  # a mix of sources (data/mix.py:MixSet)
                return int(s.num_classes), "the sources' manifests"
            return int(s.num_classes), f"the manifest of {s.urls[0]}" if s.urls else "the demo data"
    return 0, "unknown"


def described(spec: str) -> Optional[ShardSet]:
    """What a shard spec's manifest says, without building or reading any shard (the planner's view): a demo set's
    classes (known before it is built; no urls), a local manifest, else None."""
    spec = str(spec).strip()
    if spec.startswith("demo:"):
        classes = demo_num_classes(spec.split(":")[1])
        return ShardSet(urls=[], num_classes=classes) if classes else None
    path = Path(_local(spec))
    manifest = path if path.name == MANIFEST else path / MANIFEST
    try:
        return load_manifest(manifest) if manifest.is_file() else None
    except (OSError, ValueError):  # a broken manifest is the trainer's error to report, not the planner's
        return None


def _expand(pattern: str) -> list[str]:
    """The urls of a brace pattern, refused (one line) past MAX_URLS instead of expanding without end."""
    # braceexpand builds each {a..b} range whole before yielding a url: count first (an upper bound; nested
    # braces are counted at each level), or "{0..999999999}" takes all memory
    count = 1
    for lo, hi, step in _RANGE.findall(pattern):
        ends = [int(x) if x.lstrip("-").isdigit() else ord(x) for x in (lo, hi)]
        count *= abs(ends[1] - ends[0]) // max(abs(int(step or 1)), 1) + 1
    for items in _CHOICES.findall(pattern):
        count *= items.count(",") + 1
    try:
        urls = list(itertools.islice(braceexpand.braceexpand(pattern), MAX_URLS + 1)) if count <= MAX_URLS else []
    except ValueError:  # braceexpand's UnbalancedBracesError (its message quotes the pattern, newlines and all)
        raise ValueError(f"shard spec {pattern[:80]!r}: unbalanced braces") from None
    if count > MAX_URLS or len(urls) > MAX_URLS:
        raise ValueError(f"shard spec {pattern[:80]!r} expands to more than {MAX_URLS} urls")
    return urls


# ----- resolving -----------------------------------------------------------------------------------------------
def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _missing(path) -> FileNotFoundError:
    shown = str(path) if str(path).isprintable() else repr(str(path))  # one line, whatever the spec holds
    return FileNotFoundError(f"shard spec: no such file: {shown}")


def load_manifest(path) -> ShardSet:
    """Read a ``manifest.json``; shard names are relative to its directory. Every listed shard must exist."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        m = json.loads(path.read_text())
        names = [s["name"] for s in m["shards"]]
        names_ = m.get("class_names")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{path}: not a shard manifest ({type(e).__name__}: {str(e)[:100]})") from None
    wrong = [k for k, ok in (("shard names", all(isinstance(n, str) and n for n in names)),
                             ("class_names", names_ is None or (isinstance(names_, list) and
                                                                all(isinstance(c, str) for c in names_))),
                             ("num_samples", _count_or_none(m.get("num_samples"))),
                             ("num_classes", _count_or_none(m.get("num_classes")))) if not ok]
    if wrong:
        raise ValueError(f"{path}: not a shard manifest (bad {', '.join(wrong)})")
    urls = []
    for name in names:
        p = name if _is_remote(name) or os.path.isabs(name) else str(path.parent.resolve() / name)
        if not _is_remote(p) and not os.path.isfile(p):
            raise _missing(p)
        urls.append(p)
    return ShardSet(urls=urls, num_samples=m.get("num_samples"), num_classes=m.get("num_classes"),
                    class_names=list(names_) if names_ is not None else None, labels=m.get("labels"))


def _count_or_none(value) -> bool:
    return value is None or (type(value) is int and value >= 0)


def _with_manifest_info(urls: list[str]) -> ShardSet:
    """Counts and classes for local shards that all appear in their directory's manifest.json."""
    out = ShardSet(urls=urls)
    if not urls or any(_is_remote(u) for u in urls):
        return out
    dirs = {Path(u).resolve().parent for u in urls}
    if len(dirs) != 1:
        return out
    mpath = dirs.pop() / MANIFEST
    if not mpath.is_file():
        return out
    try:
        m = json.loads(mpath.read_text())
        counts = {s["name"]: s["count"] for s in m["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return out
    names_ = m.get("class_names")
    if not all(_count_or_none(c) for c in [*counts.values(), m.get("num_classes")]) or not (
            names_ is None or (isinstance(names_, list) and all(isinstance(c, str) for c in names_))):
        return out
    names = [Path(u).name for u in urls]
    if all(n in counts for n in names):
        out.num_samples = sum(counts[n] for n in names)
        out.labels = m.get("labels") if len(names) == len(counts) else None
    out.num_classes, out.class_names = m.get("num_classes"), m.get("class_names")
    return out


def resolve_shards(spec: str, cache_dir: str = "data_cache") -> ShardSet:
    """Turn a shard spec into a :class:`ShardSet`.

    Forms: ``"demo:digits"``, ``"demo:digits:val"``, ``"demo:photos"``, ``"demo:photos:val"`` (built under
    ``cache_dir`` on first use); a brace pattern ``"d/train-{000000..000009}.tar"``; a ``manifest.json`` (or a
    directory holding one); a ``.txt`` file listing one url per line (``#`` comments; relative paths are relative
    to the list file); ``pipe:...`` / ``http(s)://...`` urls (passed through, braces expanded); a single
    ``.tar``/``.tar.gz``/``.tgz`` shard. Missing local files raise ``FileNotFoundError`` naming the path.
    """
    spec = str(spec).strip()
    if not spec:
        raise ValueError("empty shard spec")
    if spec.startswith("demo:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("train", "val")):
            raise ValueError(f"bad demo spec {spec!r}: use demo:NAME or demo:NAME:val")
        paths = ensure_demo_shards(parts[1], cache_dir)
        return load_manifest(paths[parts[2] if len(parts) == 3 else "train"])
    if _is_remote(spec):
        return ShardSet(urls=_expand(spec))
    if "{" in spec:
        urls = [_local(u) for u in _expand(spec)]
        for u in urls:
            if not os.path.isfile(u):
                raise _missing(u)
        return _with_manifest_info(urls)
    path = Path(_local(spec))
    if path.is_dir():
        return load_manifest(path / MANIFEST)
    if not path.exists():
        raise _missing(path)
    if path.suffix == ".json":
        return load_manifest(path)
    if path.name.endswith(TAR_SUFFIXES):  # one shard (also gzip-compressed), not a list of urls
        return _with_manifest_info([str(path)])
    urls = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:  # a binary file given as a list: name it, not only the codec
        raise ValueError(f"shard list {path} is not UTF-8 text (byte at position {e.start}): a list file holds one "
                         f"shard url or pattern per line") from None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for u in _expand(line):
            if not _is_remote(u):
                u = _local(u)
                if not os.path.isabs(u):
                    u = str(path.parent.resolve() / u)
                if not os.path.isfile(u):
                    raise _missing(u)
            urls.append(u)
    if not urls:
        raise ValueError(f"{path}: lists no shard urls")
    return _with_manifest_info(urls)
