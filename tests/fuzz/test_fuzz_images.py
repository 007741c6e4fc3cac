"""Fuzzing image headers and decoding (data/transforms.py): truncated and mutated JPEG/PNG/WebP, and bombs.

Property: ``decode`` returns an RGB uint8 (3,H,W) image no larger than ``max_pixels`` or raises ``DecodeError``
(``TooLarge`` for a header over the limit) with one line; the header readers likewise; nothing else escapes, and
no image runs past a time bound. The loader skips and counts a sample whose image raises (tests/test_data.py).
"""
import io
import warnings
import struct
import zlib

import numpy as np
import pytest
import torch
from fuzz_bounds import one_line, time_limit
from hypothesis import given
from hypothesis import strategies as st

from vitscale.data.reduced_decode import train_image
from vitscale.data.transforms import (Crop, DecodeError, DeferredJpeg, TooLarge, decode, jpeg_size, materialize,
                                      read_header)

MAX_PIXELS = 1 << 16  # the fuzzed decoder's limit: what gets decoded stays small


def _photo(h=48, w=64) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[100:100 + h, 180:180 + w])


def _save(fmt: str, mode: str = "RGB", **kw) -> bytes:
    from PIL import Image

    im = Image.fromarray(_photo()).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    return _save("JPEG", exif=exif.tobytes())


SEEDS = {"jpeg": _save("JPEG", quality=90), "progressive": _save("JPEG", progressive=True),
         "gray_jpeg": _save("JPEG", "L"), "cmyk_jpeg": _save("JPEG", "CMYK"), "exif_jpeg": _exif_rotated(),
         "png": _save("PNG"), "palette_png": _save("PNG", "P"), "rgba_png": _save("PNG", "RGBA"),
         "png16": _save("PNG", "I;16"), "webp": _save("WEBP", quality=80), "gif": _save("GIF")}


def _outcome(data: bytes):
    """The decoded image, or the refusal's message; checks every reader of the same bytes agrees on the limit."""
    with time_limit(5, "image decoder"):
        try:
            head = read_header(data, MAX_PIXELS)
        except DecodeError as e:
            one_line(str(e))
            head = None
        try:
            size = jpeg_size(data, MAX_PIXELS)
            assert size is None or size[0] * size[1] <= MAX_PIXELS
        except TooLarge as e:
            one_line(str(e))
        _train_images(data)
        try:
            img = decode(data, MAX_PIXELS)
        except DecodeError as e:
            one_line(str(e))
            return str(e)
    assert head is not None, "decoded an image whose header was refused"
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
    assert img.shape[1] * img.shape[2] <= MAX_PIXELS, f"decoded {tuple(img.shape)}: over max_pixels"
    return img


def _train_images(data: bytes) -> None:
    """What a loader worker does by default: reduced-size decoding (simplejpeg's 1/2-1/8 DCT scaling of the
    48x64 seeds, at 12, 6 and 2 px outputs) or the full decode, then the crop. An image or DecodeError."""
    for size in (12, 6, 2):
        try:
            img = train_image(data, size, torch.Generator().manual_seed(size), max_pixels=MAX_PIXELS)
        except DecodeError as e:
            one_line(str(e))
            continue
        assert img.dtype == torch.uint8 and tuple(img.shape) == (3, size, size)


def test_every_seed_decodes_as_its_photo():
    for name, data in SEEDS.items():
        img = _outcome(data)
        assert torch.is_tensor(img), (name, img)
        want = (3, 64, 48) if name == "exif_jpeg" else (3, 48, 64)  # orientation 6: stored sideways
        assert tuple(img.shape) == want, name


@given(st.sampled_from(sorted(SEEDS)), st.floats(0, 1, exclude_max=True))
def test_truncated_images(name, frac):
    data = SEEDS[name]
    _outcome(data[:int(frac * len(data))])


@given(st.sampled_from(sorted(SEEDS)), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                                   min_size=1, max_size=8), st.booleans())
def test_mutated_images(name, edits, near_start):
    data = bytearray(SEEDS[name])
    span = min(len(data), 700) if near_start else len(data)  # the headers, or anywhere
    for where, value in edits:
        data[int(where * span)] = value
    _outcome(bytes(data))


@given(st.sampled_from(sorted(SEEDS)), st.floats(0, 1, exclude_max=True),
       st.sampled_from([b"\xff\xd0", b"\xff\xd8", b"\xff\xff", b"\xff\x01", b"\xff\xe1\x00\x02", b"\x00",
                        b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03", b"IHDR", b"\xff\xda"]))
def test_inserted_markers(name, frac, chunk):
    data = SEEDS[name]
    at = int(frac * min(len(data), 400))
    _outcome(data[:at] + chunk + data[at:])


@given(st.binary(max_size=300), st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP",
                                                 b"GIF89a", b"II*\0", b"BM", b"%!PS-Adobe-3.0 EPSF-3.0\n"]))
def test_random_bytes_behind_a_magic(raw, magic):
    assert isinstance(_outcome(magic + raw), str) or magic  # random bytes alone are never an image


# ----- bombs: a header claiming a huge image is refused before a pixel is decoded -------------------------------
def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(w: int, h: int) -> bytes:
    rows = zlib.compress(bytes(1 + 3 * min(w, 4096)) * 16, 9)  # a few rows of zeros; a bomb is all zeros
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def _jpeg_with_size(data: bytes, h: int, w: int) -> bytes:
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + struct.pack(">HH", h, w) + data[at + 9:]


BOMBS = {"png 100k x 100k": _png_bomb(100_000, 100_000), "png 300 x 300": _png_bomb(300, 300),
         "jpeg 65535 x 65535": _jpeg_with_size(SEEDS["jpeg"], 65535, 65535),
         "webp 16383 x 16383": SEEDS["webp"][:26] + struct.pack("<HH", 0x3FFF, 0x3FFF) + SEEDS["webp"][30:],
         "gif 65535 x 65535": SEEDS["gif"][:6] + struct.pack("<HH", 65535, 65535) + SEEDS["gif"][10:]}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bombs_are_refused_from_the_header(name):
    with time_limit(2, "bomb check"):
        with pytest.raises(DecodeError) as e:
            decode(BOMBS[name], MAX_PIXELS)
    one_line(str(e.value))
    if "300 x 300" in name or "webp" in name:
        assert isinstance(e.value, TooLarge) or "webp" in name
    else:
        assert isinstance(e.value, TooLarge), str(e.value)


def test_a_parameterless_marker_cannot_hide_the_real_frame_size():
    """libjpeg skips RSTn/TEM markers before the frame header (they have no length). A header reader that took
    their next two bytes as a length jumped into an APP0 segment's payload and found a fake small frame there,
    while the decoder decoded the real, larger one: a way past ``max_pixels``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (512, 512), (120, 30, 200)).save(buf, format="JPEG")
    real = buf.getvalue()  # 512 x 512 = 4x MAX_PIXELS
    fake_sof = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03" + bytes(15)  # 16 x 16
    payload = bytearray(65533)
    payload[65508 - 8:65508 - 8 + len(fake_sof)] = fake_sof  # where "FF E0" read as a length lands
    crafted = real[:2] + b"\xff\xd0" + b"\xff\xe0\xff\xff" + bytes(payload) + real[2:]
    with pytest.raises(TooLarge):
        decode(crafted, MAX_PIXELS)


def test_a_batch_of_damaged_deferred_jpegs_keeps_its_size_and_counts_them():
    crop = Crop(0, 0, 32, 32, False, 16)
    good = DeferredJpeg(torch.frombuffer(bytearray(SEEDS["jpeg"]), dtype=torch.uint8), crop)
    for cut in (10, 200, len(SEEDS["jpeg"]) // 2):
        bad = DeferredJpeg(torch.frombuffer(bytearray(SEEDS["jpeg"][:cut]), dtype=torch.uint8), crop)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            batch, bad_count = materialize([good, bad, good], "cpu")
        assert batch.shape == (3, 3, 16, 16) and bad_count == 1 and len(said) == 1, cut
