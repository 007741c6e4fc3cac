"""Fuzzing the tar reader (data/tarstream.py) and the shard reader on top of it (data/tario.py).

Property: every input is read (members equal to what Python's ``tarfile`` reads, where it reads them) or refused
with one line (``TarError``/``EOFError`` from the tar reader; one trailing ``ShardError`` from ``iter_shard``,
which the loader counts as a damaged shard); nothing else escapes, no read asks for more than 1 MiB whatever a
header claims, and nothing runs past a time bound.
"""
import gzip
import io
import tarfile

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_bounds import MAX_READ_REQUEST, StingyStream, memory_limit, one_line, time_limit
from vitscale.data.tario import ShardError, iter_shard
from vitscale.data.tarstream import BLOCK, TarError, tar_members

FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]
names = st.one_of(st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s),
                  st.builds(lambda a, b: "d/" * a + "k" * b + ".jpg", st.integers(0, 80), st.integers(1, 250)))


def _archive(members, fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SMALL = _archive([(f"s{i:02d}.{ext}", bytes([i]) * (300 + 50 * i)) for i in range(3) for ext in ("jpg", "cls")])


def _read_all(stream) -> list:
    return [(m.name, m.read()) for m in tar_members(stream)]


def _outcome(raw: bytes, trickle: int = 0):
    """(members, None) or (None, the error's one-line message); nothing but the tar errors may escape."""
    stream = StingyStream(raw, trickle)
    with time_limit(5, "tar reader"), memory_limit(4 * len(raw) + (4 << 20), "tar reader"):
        try:
            return _read_all(stream), None
        except (TarError, EOFError) as e:
            one_line(str(e))
            return None, str(e)


def _fix_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


@given(st.binary(max_size=3 * BLOCK))
def test_random_bytes_are_refused_with_one_line(raw):
    _outcome(raw)


@given(st.lists(st.tuples(names, st.binary(max_size=700)), max_size=4), st.sampled_from(FORMATS),
       st.integers(0, 9))
def test_archives_tarfile_writes_read_as_tarfile_reads_them(members, fmt, trickle):
    try:
        raw = _archive(members, fmt)
    except ValueError:  # a name this format cannot hold (ustar: over 256 bytes)
        return
    got, error = _outcome(raw, trickle)
    assert error is None
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        want = [(i.name, tar.extractfile(i).read()) for i in tar]
    assert got == want


def test_truncation_at_every_offset_is_an_error_not_a_shorter_archive():
    full, _ = _outcome(SMALL)
    for cut in range(len(SMALL.rstrip(b"\0")) + 2 * BLOCK):  # past that, the archive is whole
        got, error = _outcome(SMALL[:cut])
        # a cut inside the trailing zero blocks reads every member: the shard reader checks those blocks
        assert error is not None or got == full, cut


@given(st.data())
def test_mutated_header_fields_with_a_valid_checksum(data):
    raw = bytearray(SMALL)
    header = 3 * BLOCK if data.draw(st.booleans()) else 0  # the first or a later member's header
    field = data.draw(st.sampled_from([(0, 100), (100, 8), (124, 12), (136, 12), (156, 1), (157, 100),
                                       (257, 8), (345, 155)]))
    value = data.draw(st.binary(min_size=field[1], max_size=field[1]))
    raw[header + field[0]:header + sum(field)] = value
    _fix_checksum(memoryview(raw)[header:header + BLOCK])
    _outcome(bytes(raw))


HUGE = 100 << 30  # 100 GiB


def _with_size(field: bytes, kind: bytes = b"0") -> bytes:
    raw = bytearray(SMALL)
    raw[124:136], raw[156:157] = field, kind
    _fix_checksum(memoryview(raw)[:BLOCK])
    return bytes(raw)


CLAIMS = [b"%011o\0" % (HUGE // 8), b"\x80" + HUGE.to_bytes(11, "big"), b"\x80" + b"\xff" * 11, b"77777777777\0"]


@pytest.mark.parametrize("kind", [b"0", b"L", b"x", b"g", b"5", b"S"])
@pytest.mark.parametrize("field", CLAIMS + [b"\xff" * 12, b"9" * 12, b"-1" + b"\0" * 10, b"0x10\0" + b"\0" * 7,
                                            b" " * 12, b"\0" * 12])
def test_size_fields_claiming_terabytes_or_nonsense(kind, field):
    got, error = _outcome(_with_size(field, kind))  # StingyStream fails any read over 1 MiB
    # (a size of 0 is valid: the member's data is then read as the next header, here a zero block = the end)
    assert error is not None or (field.strip(b" \0") == b"" and len(got) <= 1)


def _pax(records: bytes, then=SMALL) -> bytes:
    header = bytearray(BLOCK)
    header[:11], header[100:108], header[124:136], header[156:157] = b"././@Pax\0\0\0", b"0000644\0", \
        b"%011o\0" % len(records), b"x"
    header[257:263] = b"ustar\0"
    _fix_checksum(header)
    return bytes(header) + records + bytes(-len(records) % BLOCK) + then


@given(st.lists(st.one_of(
    st.builds(lambda k, v: b"%d %s=%s\n" % (len(k) + len(v) + 4 + 2, k, v), st.sampled_from([b"path", b"size"]),
              st.binary(max_size=30)),
    st.binary(max_size=40),
    st.builds(lambda n, rest: b"%d %s" % (n, rest), st.integers(-5, 60), st.binary(max_size=20))), max_size=5))
@example([b"0 path=x\n"])
@example([b"-8 size=1\n"])
@example([b"30 size=%d\n" % HUGE])
@example([b"1_0 path=x\n"])
def test_pax_records_never_hang_or_escape(records):
    _outcome(_pax(b"".join(records)))


@given(st.sampled_from(["L", "K"]), st.integers(0, 5000))
def test_gnu_long_names_of_any_length(kind, length):
    name = "n" * length + ".jpg"
    info = tarfile.TarInfo("x.jpg")
    info.size = 3
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        if kind == "L":
            info.name = name
        else:
            info.type, info.linkname, info.size = tarfile.SYMTYPE, name, 0
        tar.addfile(info, io.BytesIO(b"abc"))
    got, error = _outcome(buf.getvalue())
    assert error is None and got == ([(name, b"abc")] if kind == "L" else [])


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                                  tarfile.FIFOTYPE, tarfile.DIRTYPE, tarfile.GNUTYPE_SPARSE, b"V", b"M", b"Z"])
def test_links_devices_and_sparse_members_are_skipped_or_refused(kind):
    raw = bytearray(SMALL)
    raw[156:157] = kind
    _fix_checksum(memoryview(raw)[:BLOCK])
    got, error = _outcome(bytes(raw))
    assert error is not None or [n for n, _ in got] == [f"s{i:02d}.{e}" for i in range(3) for e in ("jpg", "cls")
                                                        ][1:]


def test_a_real_gnu_sparse_member_is_read_or_refused(tmp_path):
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    import subprocess

    out = tmp_path / "s.tar"
    if subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(out), "-C", str(tmp_path), "sparse.jpg"],
                      capture_output=True).returncode:
        pytest.skip("no GNU tar")
    _outcome(out.read_bytes())
    items = list(iter_shard(str(out)))
    assert all(isinstance(i, dict) for i in items[:-1])


def test_a_tar_nested_in_a_member_is_just_bytes(tmp_path):
    inner = _archive([("a.jpg", b"x" * 10)])
    raw = _archive([("s1.jpg", inner), ("s1.cls", b"1"), ("s2.tar", inner), ("s3.jpg", gzip.compress(inner))])
    got, error = _outcome(raw)
    assert error is None and got[0] == ("s1.jpg", inner)
    (tmp_path / "n.tar").write_bytes(raw)
    samples = list(iter_shard(str(tmp_path / "n.tar")))
    assert [s["__key__"] for s in samples] == ["s1", "s3"] and samples[0]["jpg"] == inner


# ----- the shard reader: a file on disk, plain or gzip ----------------------------------------------------------
def _shard_outcome(path: str):
    with time_limit(10, "shard reader"), memory_limit(32 << 20, "shard reader"):
        items = list(iter_shard(path))
    errors = [i for i in items if isinstance(i, ShardError)]
    assert len(errors) <= 1 and (not errors or items[-1] is errors[0]), "at most one ShardError, last"
    for e in errors:
        one_line(e.message)
        assert e.read == len(items) - 1
    return items[:-1] if errors else items, errors


@given(st.binary(max_size=2 * BLOCK), st.booleans())
def test_any_file_as_a_shard_is_read_or_one_counted_error(tmp_path_factory, raw, gz):
    path = tmp_path_factory.mktemp("fuzz") / ("x.tar.gz" if gz else "x.tar")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    samples, errors = _shard_outcome(str(path))
    assert errors or samples


def test_every_truncation_of_a_shard_is_counted_and_keeps_only_whole_samples(tmp_path):
    full, none = _shard_outcome(str(_write(tmp_path / "full.tar", SMALL)))
    assert not none and [s["__key__"] for s in full] == ["s00", "s01", "s02"]
    # a cut after this leaves every member and 1024 zero bytes (padding + end blocks): the archive is whole
    end = len(SMALL.rstrip(b"\0")) + 2 * BLOCK
    for cut in range(0, end, 37):
        for gz in (False, True):
            raw = gzip.compress(SMALL)[:cut * len(gzip.compress(SMALL)) // len(SMALL)] if gz else SMALL[:cut]
            samples, errors = _shard_outcome(str(_write(tmp_path / f"c{cut}{gz}.tar{'.gz' * gz}", raw)))
            assert len(errors) == 1, cut
            # never a partial sample
            assert [_bytes(s) for s in samples] == [_bytes(s) for s in full[:len(samples)]], cut


def _bytes(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k != "__url__"}


def _write(path, raw: bytes):
    path.write_bytes(raw)
    return path


def test_a_gzip_shard_of_zeros_after_the_archive_is_bounded(tmp_path):
    # a gzip bomb: zeros after a valid archive (1 TB of them compress to ~1 GB); reading must stop after the
    # 4 MiB a tar writer may pad with, not decompress them all
    path = tmp_path / "bomb.tar.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(SMALL)
        zeros = bytes(1 << 20)
        for _ in range(6):
            f.write(zeros)
    with time_limit(10, "shard reader on a gzip bomb"):
        items = list(iter_shard(str(path)))
    assert isinstance(items[-1], ShardError) and "after the end-of-archive" in items[-1].message


def test_a_member_claiming_100_gib_in_a_real_file_is_refused_without_allocating(tmp_path):
    path = _write(tmp_path / "huge.tar", _with_size(b"%011o\0" % HUGE))
    with memory_limit(8 << 20, "shard reader"):
        items = list(iter_shard(str(path)))
    assert len(items) == 1 and isinstance(items[0], ShardError), items
    assert MAX_READ_REQUEST < HUGE
