"""vitscale's streaming tar reader against Python's tarfile on archives other tools write, and on damage."""
import gzip
import io
import tarfile

import pytest

from vitscale.data.tario import iter_shard
from vitscale.data.tarstream import TarError, tar_members


def _read(stream, wanted=lambda name: True) -> list:
    return [(m.name, m.read() if wanted(m.name) else None) for m in tar_members(stream)]

NAMES = ["a.jpg", "dir/sub/b.cls", "x" * 99 + ".jpg",                      # fits the 100-byte name field
         "deep/" * 30 + "long.jpg",                                       # needs the ustar prefix, GNU or pax
         "k" * 140 + ".png",                                              # a base name longer than 100 bytes
         "ünïcødé-ключ.jpg", "empty.txt", "block.bin"]


def _archive(fmt: int, names=NAMES) -> tuple[bytes, dict]:
    buf, want = io.BytesIO(), {}
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("adir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            data = b"" if name == "empty.txt" else bytes([i]) * (512 if name == "block.bin" else 1000 + 37 * i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            want[name] = data
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
    return buf.getvalue(), want


def _tarfile_members(raw: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        return {i.name: tar.extractfile(i).read() for i in tar if i.isreg()}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_tarfiles_own_reading(fmt):
    names = [n for n in NAMES if fmt != tarfile.USTAR_FORMAT or len(n.rsplit("/", 1)[-1]) <= 100]
    raw, want = _archive(fmt, names)
    got = dict(_read(io.BytesIO(raw)))
    assert got == want == _tarfile_members(raw)  # no directory, no symlink; every name and byte as written
    skipped = _read(io.BytesIO(raw), lambda n: n.endswith(".cls"))
    assert [n for n, d in skipped if d is not None] == ["dir/sub/b.cls"] and len(skipped) == len(names)


def test_webdataset_shardwriter_and_gzip_shards_read_like_tarfile(tmp_path):
    import webdataset as wds

    pattern = str(tmp_path / "wds-%02d.tar")
    with wds.ShardWriter(pattern, maxcount=1000) as sink:
        for i in range(20):
            sink.write({"__key__": f"s{i:03d}", "jpg": bytes([i]) * (100 + i), "cls": str(i % 3), "json": {"i": i}})
    raw = (tmp_path / "wds-00.tar").read_bytes()
    assert dict(_read(io.BytesIO(raw))) == _tarfile_members(raw)
    (tmp_path / "wds.tar.gz").write_bytes(gzip.compress(raw))
    for url in (str(tmp_path / "wds-00.tar"), str(tmp_path / "wds.tar.gz")):
        samples = list(iter_shard(url))
        assert [s["__key__"] for s in samples] == [f"s{i:03d}" for i in range(20)]
        assert samples[7]["jpg"] == bytes([7]) * 107 and samples[7]["cls"] == b"1" and "json" not in samples[7]


def test_damage_is_an_error_naming_it():
    raw, _ = _archive(tarfile.GNU_FORMAT)
    bad = bytearray(raw)
    bad[512 + 10] ^= 0x20  # one bit of the second header's name: its checksum no longer matches
    with pytest.raises(TarError, match="bad tar header at byte 512: checksum"):
        _read(io.BytesIO(bytes(bad)))
    with pytest.raises(EOFError, match="truncated tar: a.jpg .* cut short"):
        _read(io.BytesIO(raw[:1024 + 300]))
    with pytest.raises(EOFError, match="truncated tar: no end-of-archive marker"):
        _read(io.BytesIO(raw[:1024 + 1024]))  # cut at a header boundary
    with pytest.raises(EOFError, match="empty file"):
        _read(io.BytesIO(b""))


class Trickle(io.RawIOBase):
    """A pipe that hands out at most 7 bytes per read."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def read(self, n=-1):
        n = 7 if n < 0 else min(n, 7)
        out = self.data[self.at:self.at + n]
        self.at += len(out)
        return out


def test_short_reads_of_a_pipe_are_completed():
    raw, want = _archive(tarfile.PAX_FORMAT)
    assert dict(_read(Trickle(raw))) == want
