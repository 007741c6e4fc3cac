"""Reading one WebDataset tar shard as a stream: one sample in memory at a time, never unpickled, damage detected.

Only image (``png/jpg/jpeg/webp``) members and the member holding the label (``cls``, ``txt`` or ``json``, see
``data.label_key``) are read; everything else (``.pyd``, ``.pickle``, ``.pth``, ...) is skipped unread, so a shard
carrying a pickle payload cannot execute it. ``.tar.gz``/``.tgz`` shards (any gzip stream, recognised by its
magic bytes) are decompressed on the fly.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from webdataset.gopen import gopen

from vitscale.data.tarstream import short, tar_members

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
LABEL_EXTS = ("cls", "txt", "json")
_END_MARKER = 1024  # a complete tar ends with two zero 512-byte blocks (then zero padding)
_INT64 = (-(1 << 63), (1 << 63) - 1)
# Zero padding after the end-of-archive blocks: a record of GNU tar's largest blocking factor is 2 MiB. More is
# not a tar writer's padding (a gzip bomb of zeros would otherwise be decompressed to its end).
_MAX_TRAILING = 4 << 20
# A sample key longer than this is refused (the shard is damaged or hostile): readers keep keys (check-shards,
# warnings), and a gzip shard of 1 MB-long names costs ~1 KB each on disk, ~1000x that once read.
MAX_KEY_CHARS = 4096


@dataclass(frozen=True)
class ShardError:
    """A shard could not be read to its end: ``read`` samples came before the damage (the sample being read
    when it happened is dropped: it may be incomplete)."""
    url: str
    message: str
    read: int


class _Stream:
    """File wrapper that replays peeked bytes, names its shard in errors and keeps the last bytes read (to check
    the tar end-of-archive marker, on the decompressed stream for gzip shards)."""

    def __init__(self, f, url: str, head: bytes = b""):
        self.f, self.url, self.head, self.tail = f, url, head, b""

    def __repr__(self) -> str:  # tar errors name their stream: say which shard, not an object address
        return self.url

    def read(self, n: int = -1) -> bytes:
        if self.head:
            b, self.head = (self.head, b"") if n < 0 or n >= len(self.head) else (self.head[:n], self.head[n:])
        else:
            b = self.f.read(n)
        if b:
            self.tail = (self.tail + b)[-_END_MARKER:]
        return b

    def close(self) -> None:
        self.f.close()


def _open(url: str):
    """(raw file, decompressed stream with a tail) for a local path, ``file://``, ``pipe:`` or ``http(s)://`` url."""
    raw = gopen(url, "rb")
    head = raw.read(2)
    if head == b"\x1f\x8b":  # gzip: a .tar.gz / .tgz shard
        return raw, _Stream(gzip.GzipFile(fileobj=_Stream(raw, url, head), mode="rb"), url)
    return raw, _Stream(raw, url, head)


def _ext(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: the key is everything before the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


def _members(stream: _Stream, url: str, wanted: frozenset) -> Iterator[dict]:
    """Samples grouped from consecutive members with the same key; raises on damage or a duplicate member."""
    cur: Optional[dict] = None
    for member in tar_members(stream):
        key, ext = _ext(member.name)
        if cur is not None and key != cur["__key__"]:
            yield cur  # complete: the next member has another key (even if its bytes turn out to be cut short)
            cur = None
        if ext not in wanted:
            continue
        if cur is None:
            if len(key) > MAX_KEY_CHARS:
                raise ValueError(f"sample key {short(key)} is longer than {MAX_KEY_CHARS} characters")
            cur = {"__key__": key, "__url__": url}
        if ext in cur:
            raise ValueError(f"duplicate member {short(member.name)}")
        cur[ext] = member.read()
    trailing = 0
    while trailing <= _MAX_TRAILING:  # the rest: end-of-archive blocks and record padding
        got = len(stream.read(1 << 16))
        if not got:
            break
        trailing += got
    else:
        raise ValueError(f"more than {_MAX_TRAILING >> 20} MiB after the end-of-archive marker")
    if stream.tail != bytes(_END_MARKER):
        raise EOFError("truncated tar (no end-of-archive marker)")
    if cur is not None:
        yield cur


def iter_shard(url: str, label_ext: str = "cls") -> Iterator[Union[dict, ShardError]]:
    """The samples of one shard as webdataset-style dicts (``__key__``, ``__url__``, raw bytes per extension), in
    tar order, then a :class:`ShardError` if the shard could not be read to its end (or holds no sample).

    A shard also counts as truncated when its stream does not end with the tar end-of-archive marker (a copy cut
    at a header boundary looks like a complete archive otherwise); the sample in progress then is not yielded."""
    wanted = frozenset(IMAGE_EXTS) | {label_ext}
    count = 0
    try:
        raw, stream = _open(url)
    except Exception as e:
        yield ShardError(url, f"cannot open: {type(e).__name__}: {e}", 0)
        return
    error: Optional[str] = None
    try:
        for sample in _members(stream, url, wanted):
            count += 1
            yield sample
    except Exception as e:  # truncated / corrupt tar or gzip, duplicate member names
        error = f"{type(e).__name__}: {e}"
    finally:
        try:
            raw.close()
        except Exception as e:  # a pipe: command that failed
            error = error or f"{type(e).__name__}: {e}"
    if error is None and count == 0:
        error = "empty shard (no samples)"  # a failed conversion or copy; worth a warning and a count
    if error is not None:
        yield ShardError(url, error, count)


def read_shard(url: str, label_ext: str = "cls") -> tuple[list[dict], Optional[str]]:
    """A whole shard at once (for tools and tests; the loaders stream with :func:`iter_shard`)."""
    samples, error = [], None
    for item in iter_shard(url, label_ext):
        if isinstance(item, ShardError):
            error = item.message
        else:
            samples.append(item)
    return samples, error


# ----- what a sample holds ----------------------------------------------------------------------------------------
def label_ext(label_key: str) -> str:
    """The member extension ``data.label_key`` reads: ``cls``, ``txt`` or ``json`` (``json:FIELD``)."""
    ext = label_key.split(":", 1)[0]
    if ext not in LABEL_EXTS or (ext == "json") != (":" in label_key) or label_key.endswith(":"):
        raise ValueError(f"data.label_key={label_key!r}: use 'cls', 'txt' or 'json:FIELD' (e.g. json:label)")
    return ext


def sample_image(sample: dict) -> bytes:
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        raise ValueError("no image member")
    return data


def sample_label(sample: dict, label_key: str = "cls") -> Optional[int]:
    """The sample's integer label, or None when it has none. Raises ``ValueError`` naming the member when the
    label is not an integer or does not fit int64."""
    ext = label_key.split(":", 1)[0]
    raw = sample.get(ext)
    if raw is None:
        return None
    if ext == "json":
        try:
            value = json.loads(raw)
        except RecursionError:  # "[[[[..." nested deeper than Python's stack: as unreadable as any bad JSON
            raise ValueError(".json label member is nested too deeply") from None
        for part in label_key.split(":", 1)[1].split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f".json field {label_key[5:]!r} is {value!r}, not an integer label")
    else:
        value = raw.decode("ascii", errors="replace").strip()
    try:
        label = int(value)
    except ValueError:
        raise ValueError(f".{ext} label {str(value)[:40]!r} is not an integer") from None
    if not _INT64[0] <= label <= _INT64[1]:
        raise ValueError(f".{ext} label {str(value)[:40]} does not fit int64")
    return label


def image_and_label(sample: dict, label_key: str = "cls") -> tuple[bytes, int]:
    """(image bytes, label; -1 when the sample has none)."""
    label = sample_label(sample, label_key)
    return sample_image(sample), -1 if label is None else label
