"""`vitscale check-shards SPEC` (or ``--config FILE``): read every shard (in parallel), report what would hurt training.

Per shard: samples, labels, samples without an image or a valid label, unreadable image headers (or, with
``--decode``, images that do not decode), images over ``data.max_pixels``, keys seen twice, damage (truncated or
unreadable tar). Over all shards: the label histogram, duplicate keys across shards, and whether the shards look
class-sorted (each shard holds far fewer classes than a shuffled shard of its size would), which leaves batches
with few classes. The exit status is 1 when anything of that is found, 0 when the shards look fine. A mix of sources
(``data.train_shards`` as a list or ``"0.7*A + cc=0.3*B"``) is reported source by source.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from vitscale.config.load import load_config
from vitscale.config.sources import parse_sources
from vitscale.data.shards import resolve_shards
from vitscale.data.tario import ShardError, iter_shard, label_ext, sample_image, sample_label
from vitscale.data.tarstream import short
from vitscale.data.transforms import DEFAULT_MAX_PIXELS, TooLarge, decode, read_header

MAX_LISTED = 10  # bad samples named per shard in the report
# Keys are remembered as fixed-size digests, not as text: a report holds every key of every shard, and its memory
# must not grow with how long a shard claims its keys are. 16 bytes: no false duplicate among billions of keys.
_DIGEST = 16


@dataclass
class ShardReport:
    url: str
    samples: int = 0
    labels: Counter = field(default_factory=Counter)
    no_label: int = 0
    bad: list = field(default_factory=list)  # [(key, why)], first MAX_LISTED
    bad_count: int = 0
    over_limit: int = 0
    key_digests: bytearray = field(default_factory=bytearray)  # _DIGEST bytes per sample, in shard order
    label_key: str = "cls"
    error: Optional[str] = None


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=_DIGEST).digest()


def _check_sample(sample: dict, rep: ShardReport, label_key: str, max_pixels, decode_all: bool) -> None:
    key = short(sample["__key__"])
    try:
        label = sample_label(sample, label_key)
        data = sample_image(sample)
        if decode_all:
            decode(data, max_pixels)
        else:
            read_header(data, max_pixels)
    except TooLarge as e:
        rep.over_limit += 1
        rep.bad_count += 1
        if len(rep.bad) < MAX_LISTED:
            rep.bad.append((key, str(e)))
        return
    except Exception as e:
        rep.bad_count += 1
        if len(rep.bad) < MAX_LISTED:
            rep.bad.append((key, str(e)))
        return
    if label is None:
        rep.no_label += 1
    else:
        rep.labels[label] += 1


def check_shard(url: str, label_key: str = "cls", max_pixels: Optional[int] = None,
                decode_all: bool = False) -> ShardReport:
    """One shard's report (streamed: one sample in memory at a time)."""
    rep = ShardReport(url, label_key=label_key)
    for item in iter_shard(url, label_ext(label_key)):
        if isinstance(item, ShardError):
            rep.error = item.message
            continue
        rep.samples += 1
        rep.key_digests += _digest(item["__key__"])
        _check_sample(item, rep, label_key, max_pixels, decode_all)
    return rep


def _check_job(job) -> ShardReport:
    return check_shard(*job)


def _expected_distinct(hist: Counter, n: int) -> float:
    """Distinct labels expected in n samples drawn from the label distribution ``hist``."""
    total = sum(hist.values())
    return sum(1 - (1 - c / total) ** n for c in hist.values())


def class_sorted(reports: list[ShardReport], hist: Counter) -> Optional[str]:
    """A sentence when shards hold far fewer classes than shuffled shards of their size would, else None."""
    if len(hist) < 2:
        return None
    got = [len(r.labels) for r in reports if r.samples]
    want = [_expected_distinct(hist, sum(r.labels.values())) for r in reports if r.samples]
    if not got or sum(want) == 0 or sum(got) >= 0.5 * sum(want):
        return None
    return (f"shards look class-sorted: {sum(got) / len(got):.1f} classes per shard on average, a shuffled shard of "
            f"the same size would hold {sum(want) / len(want):.1f} (rewrite them with make-shards, which shuffles, "
            f"or raise data.shards_in_flight)")


def _key_at(rep: ShardReport, index: int, digest: bytes) -> str:
    """The key of sample ``index`` of a shard, read again (only its digest was kept), cut for a message."""
    at = 0
    for item in iter_shard(rep.url, label_ext(rep.label_key)):
        if isinstance(item, ShardError):
            break
        if at == index:
            return short(item["__key__"]) if _digest(item["__key__"]) == digest else "a key"
        at += 1
    return "a key"  # the shard changed since (or a pipe: command gave other bytes)


def duplicate_keys(reports: list[ShardReport]) -> tuple[int, Optional[str]]:
    """(keys seen before, in any shard, and an example "KEY in URL and URL" of the first such key, or None)."""
    digests = np.frombuffer(b"".join(bytes(r.key_digests) for r in reports), dtype=f"V{_DIGEST}")
    if not len(digests):
        return 0, None
    unique, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    count = len(digests) - len(unique)
    if not count:
        return 0, None
    later = np.ones(len(digests), dtype=bool)
    later[first] = False
    again = int(np.argmax(later))  # the first sample whose key was seen before
    earlier = int(first[inverse[again]])
    ends = np.cumsum([len(r.key_digests) // _DIGEST for r in reports])
    shard_a, shard_b = (int(np.searchsorted(ends, i, side="right")) for i in (earlier, again))
    index_b = again - (int(ends[shard_b - 1]) if shard_b else 0)
    key = _key_at(reports[shard_b], index_b, digests[again].tobytes())
    return count, f"{key} in {reports[shard_a].url} and {reports[shard_b].url}"


def summarize(reports: list[ShardReport], num_classes: int = 0) -> dict:
    """The whole report: totals, label histogram and the list of ``problems`` (empty = fine)."""
    hist: Counter = Counter()
    for r in reports:
        hist.update(r.labels)
    duplicates, example = duplicate_keys(reports)
    problems = [f"{r.url}: {r.error}" for r in reports if r.error]
    problems += [f"{r.url}: {r.bad_count} bad sample(s), e.g. " + "; ".join(f"{k}: {w}" for k, w in r.bad[:3])
                 for r in reports if r.bad_count]
    if duplicates:
        problems.append(f"{duplicates} duplicate key(s), e.g. {example}")
    if num_classes:
        out = sorted(c for c in hist if not 0 <= c < num_classes)
        missing = sum(r.no_label for r in reports)
        if out:
            problems.append(f"{sum(hist[c] for c in out)} sample(s) with labels outside 0..{num_classes - 1}, "
                            f"e.g. {out[:5]}")
        if missing:
            problems.append(f"{missing} sample(s) without a label")
    sorted_note = class_sorted(reports, hist)
    if sorted_note:
        problems.append(sorted_note)
    return {"shards": len(reports), "samples": sum(r.samples for r in reports),
            "labels": {str(c): hist[c] for c in sorted(hist)}, "no_label": sum(r.no_label for r in reports),
            "bad_samples": sum(r.bad_count for r in reports), "over_limit": sum(r.over_limit for r in reports),
            "damaged_shards": sum(1 for r in reports if r.error), "duplicate_keys": duplicates,
            "problems": problems}


def check_shards(spec: str, *, cache_dir: str = "data_cache", label_key: str = "cls", num_classes: int = 0,
                 max_pixels: Optional[int] = None, decode_all: bool = False, workers: Optional[int] = None) -> dict:
    """Read every shard of ``spec`` in ``workers`` processes and return :func:`summarize`'s report."""
    urls = resolve_shards(spec, cache_dir).urls
    label_ext(label_key)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else (max_pixels or None)
    jobs = [(u, label_key, limit, decode_all) for u in urls]
    nproc = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if nproc > 1:
        with mp.get_context("fork").Pool(nproc) as pool:
            reports = pool.map(_check_job, jobs, chunksize=1)
    else:
        reports = [_check_job(j) for j in jobs]
    return summarize(reports, num_classes)


def print_report(report: dict, spec: str) -> None:
    labels = report["labels"]
    shown = ", ".join(f"{c}: {n}" for c, n in list(labels.items())[:20]) + (" ..." if len(labels) > 20 else "")
    print(f"{spec}: {report['shards']} shard(s), {report['samples']} samples, {len(labels)} label(s), "
          f"{report['no_label']} without a label")
    if labels:
        print(f"  labels: {shown}")
    print(f"  bad samples: {report['bad_samples']} (over the pixel limit: {report['over_limit']}), damaged shards: "
          f"{report['damaged_shards']}, duplicate keys: {report['duplicate_keys']}")
    for p in report["problems"]:
        print(f"  problem: {p}")
    print("  ok: nothing found that would hurt training" if not report["problems"] else
          f"  {len(report['problems'])} problem(s) found")


def _what(args) -> tuple:
    """(train_shards, label_key, cache_dir): the SPEC argument, or a config's data section (--config); a flag that
    the other way says would be dropped without a word is refused."""
    if args.config:
        given = [f for f, v in (("SPEC", args.spec), ("--label-key", args.label_key), ("--cache-dir", args.cache_dir))
                 if v is not None]
        if given:
            raise ValueError(f"check-shards: {', '.join(given)} and --config exclude each other (the config's data "
                             f"section says them: override it with --set data.KEY=VALUE)")
        d = load_config(args.config, args.set or []).data
        return d.train_shards, d.label_key, d.cache_dir
    if args.set:
        raise ValueError("check-shards: --set overrides a --config; without one, give the shard spec and flags")
    if not args.spec:
        raise ValueError("check-shards: give a shard spec or --config FILE")
    return args.spec, args.label_key or "cls", args.cache_dir or "data_cache"


def main(args) -> int:
    spec, label_key, cache_dir = _what(args)
    sources = parse_sources(spec)
    total = sum(s.weight for s in sources) if sources else 1.0
    targets = [(f"source {s.name} (weight {s.weight:g}, {s.weight / total:.1%} of samples): {s.spec}", s.spec)
               for s in sources] if sources else [(spec, spec)]
    reports = {}
    for title, one in targets:
        report = check_shards(one, cache_dir=cache_dir, label_key=label_key, num_classes=args.num_classes,
                              max_pixels=args.max_pixels, decode_all=args.decode, workers=args.workers)
        print_report(report, title)
        reports[title] = report
    if args.json:
        with open(args.json, "w") as f:
            out = ({s.name: r for s, r in zip(sources, reports.values())} if sources else
                   next(iter(reports.values())))
            json.dump({"sources": out} if sources else out, f, indent=1)
    return 1 if any(r["problems"] for r in reports.values()) else 0
