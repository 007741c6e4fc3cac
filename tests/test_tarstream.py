"""vitscale's streaming tar reader against Python's tarfile on archives other tools write, and on damage."""
import gzip
import io
import pickle
import tarfile

import pytest

from vitscale.data.check import check_shard, summarize
from vitscale.data.tario import ShardError, iter_shard
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


def _shard(path, keys, gz=False) -> str:
    """A shard of one tiny ``cls`` member per key (GNU long names for long keys)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key in keys:
            info = tarfile.TarInfo(key + ".cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"3"))
    path.write_bytes(gzip.compress(buf.getvalue()) if gz else buf.getvalue())
    return str(path)


def test_a_sample_key_longer_than_the_bound_ends_the_shard_in_one_short_line(tmp_path):
    # a 1 MB key (a GNU long name: ~1 KB once gzipped) is refused, not kept: check-shards held every key
    url = _shard(tmp_path / "s.tar.gz", ["a", "k" * 1_000_000, "b"], gz=True)
    items = list(iter_shard(url))
    assert [s["__key__"] for s in items[:-1]] == ["a"]
    err = items[-1]
    assert isinstance(err, ShardError) and err.read == 1
    assert "longer than 4096 characters" in err.message and len(err.message) < 200


def test_check_shards_keeps_a_fixed_size_digest_per_key_and_still_names_duplicates(tmp_path):
    # 100 keys of 4000 characters (under the bound): the report must not hold them (400 KB before)
    keys = [f"{i:04d}" + "k" * 3996 for i in range(100)]
    rep = check_shard(_shard(tmp_path / "long.tar", keys))
    assert rep.samples == 100 and len(pickle.dumps(rep)) < 10_000
    a = check_shard(_shard(tmp_path / "a.tar", ["x0", "x1", "x2"]))
    b = check_shard(_shard(tmp_path / "b.tar", ["y0", "x1", "y0"]))  # x1 seen in a, y0 twice in b
    report = summarize([a, b, rep])
    assert report["duplicate_keys"] == 2 and report["samples"] == 106
    assert f"e.g. x1 in {a.url} and {b.url}" in " ".join(report["problems"])
    # a long duplicate key is cut in the message
    rep2 = check_shard(_shard(tmp_path / "long2.tar", keys[:1]))
    problems = summarize([rep, rep2])["problems"]
    line = next(p for p in problems if "duplicate key" in p)
    assert "e.g. 0000kkk" in line and len(line) < 300
    assert all(len(p) < 1000 for p in problems)  # 3 bad samples named, each key cut
