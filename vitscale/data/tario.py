"""Reading one WebDataset tar shard: only the members we need, never unpickled, damage detected and reported.

Only image (``png/jpg/jpeg/webp``) and ``cls`` members are read; everything else (``.pyd``, ``.pickle``, ``.pth``,
...) is skipped unread, so a shard carrying a pickle payload cannot execute it.
"""
from __future__ import annotations

from typing import Optional

from vitscale.data.shards import IMAGE_EXTS

SELECTED_EXTS = frozenset(IMAGE_EXTS) | {"cls"}


def _select(fname: str) -> bool:
    base = fname.rsplit("/", 1)[-1]
    return "." in base and base.split(".", 1)[1].lower() in SELECTED_EXTS


class _TailReader:
    """File wrapper that remembers the last bytes read, to check the tar end-of-archive marker."""

    def __init__(self, f, url: str):
        self.f, self.tail, self.url = f, b"", url

    def __repr__(self) -> str:  # tar errors name their stream: say which shard, not an object address
        return self.url

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        if b:
            self.tail = (self.tail + b)[-_END_MARKER:]
        return b

    def close(self) -> None:
        self.f.close()


_END_MARKER = 1024  # a complete tar ends with two zero 512-byte blocks (then zero padding)


def read_shard(url: str) -> tuple[list[dict], Optional[str]]:
    """All samples of one shard as webdataset sample dicts (``__key__`` + raw bytes per extension), in tar
    order, and an error message if the shard could not be read to the end (samples before the damage are kept;
    the possibly incomplete last one is dropped).

    Python's tarfile silently stops at a file cut at a header boundary, so a shard also counts as truncated when
    its stream does not end with the tar end-of-archive marker.
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    error: Optional[str] = None

    def members(stream):
        nonlocal error
        try:
            for f in tar_file_iterator(stream, select_files=_select):
                f["__url__"] = url
                yield f
            while stream.read(1 << 16):  # the rest: end-of-archive blocks and record padding
                pass
            if stream.tail != bytes(_END_MARKER):
                error = "truncated tar (no end-of-archive marker)"
        except Exception as e:  # truncated / corrupt tar
            error = f"{type(e).__name__}: {e}"

    samples: list[dict] = []
    try:
        stream = _TailReader(gopen(url, "rb"), url)
    except Exception as e:
        return samples, f"cannot open: {type(e).__name__}: {e}"
    try:
        for s in group_by_keys(members(stream)):
            samples.append(s)
        if error is not None and samples:
            samples.pop()
        elif error is None and not samples:
            error = "empty shard (no samples)"  # a failed conversion or copy; worth a warning and a count
    except Exception as e:  # e.g. duplicate member names
        error = error or f"{type(e).__name__}: {e}"
    finally:
        try:
            stream.close()
        except Exception as e:  # a pipe: command that failed
            error = error or f"{type(e).__name__}: {e}"
    return samples, error


def image_and_label(sample: dict) -> tuple[bytes, int]:
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        raise ValueError("no image member")
    cls = sample.get("cls")
    label = int(cls.decode("ascii").strip()) if cls is not None else -1
    return data, label
