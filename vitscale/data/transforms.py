"""Decode and augment images as uint8 tensors. All randomness comes from an explicit ``torch.Generator``.

Batches stay uint8 (B,3,H,W) through the DataLoader (4x less inter-process traffic than float); the trainer calls
:func:`vitscale.pixels.normalize` on the device.
"""
from __future__ import annotations

import contextlib
import io
import math
import struct
import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
# Imported here (not per call) so DataLoader workers forked from the trainer inherit them ready to use.
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from vitscale.data.augment import randaugment

try:  # optional: libjpeg-turbo without torchvision's copy of the bytes (a dependency; torchvision decodes without it)
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel
    simplejpeg = None

EVAL_CROP_FRACTION = 0.875
# data.interpolation: every resize of an image (training crops, RandAugment's geometry, the eval resize). Bilinear
# is the cheaper; MAE's and timm's ViT pipelines use bicubic (0.95 vs 0.70 ms a 224-px image on one core).
INTERPOLATIONS = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}


# What PIL may open: raster formats a training image comes in. Not EPS/PDF (PIL runs Ghostscript on them) nor
# the dozens of rarer plugins, each more parser code facing a user's bytes.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # (JPEG covers MPO)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: a 1 GiB RGBA image; larger is likely a bomb
_EXIF_ORIENTATION = 0x0112


class DecodeError(ValueError):
    """The bytes are not a readable image."""


class TooLarge(DecodeError):
    """The image's header says it has more pixels than ``data.max_pixels``: not decoded."""


@contextlib.contextmanager
def our_pixel_limit():
    """PIL's own decompression-bomb limit off while it reads a header (data.max_pixels decides, with a message
    naming the size) or decodes an image that passed that check."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@dataclass(frozen=True)
class Header:
    format: str
    mode: str
    width: int
    height: int
    orientation: int  # EXIF orientation (1 = as stored)
    high_bit_depth: bool  # a PNG with 16 bits per channel


_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}


def _exif_orientation(tiff: bytes) -> int:
    """Orientation tag of an EXIF (TIFF) block's first directory; 1 when absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    end = "<" if tiff[:2] == b"II" else ">"
    ifd = struct.unpack(end + "I", tiff[4:8])[0]
    if ifd + 2 > len(tiff):
        return 1
    for i in range(struct.unpack(end + "H", tiff[ifd:ifd + 2])[0]):
        at = ifd + 2 + 12 * i
        if at + 12 > len(tiff):
            break
        tag, kind = struct.unpack(end + "HH", tiff[at:at + 4])
        if tag == _EXIF_ORIENTATION and kind == 3:
            return struct.unpack(end + "H", tiff[at + 8:at + 10])[0]
    return 1


def _jpeg_header(data: bytes) -> Optional[Header]:
    """Size, mode and EXIF orientation from a baseline/progressive JPEG's markers (no PIL: ~1 us instead of
    ~30 us per image, which the loader pays for every sample); None when the markers are unusual."""
    at, orientation, n = 2, 1, len(data)
    while at + 4 <= n:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length field (libjpeg skips just these 2 bytes)
            at += 2
            continue
        if marker == 0xD8:  # a second start of image: not a file libjpeg reads
            return None
        size = (data[at + 2] << 8) | data[at + 3]
        if marker == 0xE1 and data[at + 4:at + 10] == b"Exif\0\0":
            orientation = _exif_orientation(data[at + 10:at + 2 + size])
        elif marker in _SOF:
            if at + 10 > n:
                return None
            bits, h, w, comps = data[at + 4], (data[at + 5] << 8) | data[at + 6], (data[at + 7] << 8) | data[at + 8], \
                data[at + 9]
            if bits != 8 or comps not in _JPEG_MODES or not (h and w):
                return None
            return Header("JPEG", _JPEG_MODES[comps], w, h, orientation if 1 <= orientation <= 8 else 1, False)
        elif marker == 0xDA:  # image data before any frame header: not for us
            return None
        at += 2 + size
    return None


def _png_header(data: bytes) -> Optional[Header]:
    """Size, mode and bit depth from a PNG's IHDR, orientation from an eXIf chunk before the image data."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    w, h, depth, color = struct.unpack(">IIBB", data[16:26])
    if color not in _PNG_MODES:
        return None
    orientation, at = 1, 33
    while at + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IDAT":
            break
        if kind == b"eXIf":
            orientation = _exif_orientation(data[at + 8:at + 8 + size])
        at += 12 + size
    mode = "I;16" if depth == 16 and color == 0 else _PNG_MODES[color]
    return Header("PNG", mode, w, h, orientation if 1 <= orientation <= 8 else 1, depth > 8)


def read_header(data: bytes, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Header:
    """What the image's header says (only the header is read: by hand for JPEG and PNG, else by PIL), refusing
    images over ``max_pixels`` before any pixel is decoded. Raises :class:`DecodeError` / :class:`TooLarge`."""
    head = _jpeg_header(data) if data[:3] == b"\xff\xd8\xff" else \
        _png_header(data) if data[:8] == b"\x89PNG\r\n\x1a\n" else None
    if head is None:
        head = _pil_header(data)
    if max_pixels and head.width * head.height > max_pixels:
        raise TooLarge(f"image {head.width}x{head.height} = {head.width * head.height / 1e6:.1f} Mpx is over "
                       f"data.max_pixels={max_pixels}")
    return head


def _pil_header(data: bytes) -> Header:
    try:
        with our_pixel_limit():
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
                fmt, mode, (w, h) = im.format or "", im.mode, im.size
                # (a PNG's EXIF may sit after its pixels: PIL would decode them to find it, so only when seen)
                has_exif = fmt in ("JPEG", "WEBP", "TIFF", "MPO") or "exif" in im.info
                orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1) if has_exif else 1
    except Exception as e:
        raise DecodeError(f"cannot read image header ({len(data)} bytes): {type(e).__name__}: {e}") from None
    return Header(fmt, mode, w, h, orientation, False)


def _pil_rgb(im) -> np.ndarray:
    """Any PIL mode and bit depth -> RGB uint8 (H,W,3): 16/32-bit integer images are scaled, not clipped."""
    if im.mode.startswith("I"):  # I;16, I;16B, I (16-bit PNGs open as one of these)
        arr = np.asarray(im).astype(np.int64)
        arr = (np.clip(arr, 0, 65535) >> 8) if arr.max(initial=0) > 255 else np.clip(arr, 0, 255)
        gray = arr.astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "F":
        arr = np.asarray(im)
        hi = float(arr.max(initial=0.0))
        gray = np.clip(arr * (255.0 if hi <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def _decode_pil(data: bytes) -> torch.Tensor:
    with our_pixel_limit():  # read_header has checked data.max_pixels already
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
            im = ImageOps.exif_transpose(im)  # a portrait photo stored sideways is trained on upright
            arr = _pil_rgb(im)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _decode_jpeg_fast(data: bytes) -> Optional[torch.Tensor]:
    """An upright 8-bit RGB/grayscale JPEG -> uint8 (3,H,W) (a channels-last view), or None when the fast decoders
    refuse it. simplejpeg first: the same libjpeg-turbo settings as torchvision (bit-identical output, tested) for
    7-8% less CPU per image, without copying the bytes into a tensor first; torchvision where simplejpeg is not
    installed or refuses the file."""
    if simplejpeg is not None:
        try:
            return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)
        except Exception:
            pass
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for torchcodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception:
        return None
    return img if img.dtype == torch.uint8 else None


def decode(data: bytes, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, head: Optional[Header] = None) -> torch.Tensor:
    """Image bytes (PNG/JPEG/WebP/...) -> uint8 tensor (3,H,W), RGB, EXIF orientation applied. Any PIL mode and
    bit depth is accepted (grayscale repeated to 3 channels, alpha dropped, 16-bit scaled to 8). Images over
    ``max_pixels`` (from the header) raise :class:`TooLarge` undecoded; unreadable ones :class:`DecodeError`.
    8-bit JPEGs stored upright use libjpeg-turbo directly (:func:`_decode_jpeg_fast`); the rest, or what it
    rejects, PIL. (Never torchvision for PNG: its decode_png crashes the process, SIGSEGV, on a PNG whose
    compressed data is damaged.) ``head``: what :func:`read_header` returned for these bytes, when the caller has
    read it already."""
    head = read_header(data, max_pixels) if head is None else head
    img = None
    if head.format == "JPEG" and head.orientation == 1 and head.mode in ("RGB", "L"):
        img = _decode_jpeg_fast(data)
    if img is None:
        try:
            img = _decode_pil(data)
        except Exception as e:
            raise DecodeError(f"cannot decode image ({len(data)} bytes): {type(e).__name__}: {e}") from None
    if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
        raise DecodeError(f"unexpected decoded image shape {tuple(img.shape)}")
    return img


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                               g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in ``scale`` and aspect ratio in ``ratio``
    (the Inception crop); falls back to a centre crop clamped to ``ratio`` after 10 tries."""
    # All 22 uniforms the 10 tries could need in one draw: one generator call instead of up to 22 (each costs a
    # few microseconds, a few percent of the loader's time per image).
    u = torch.rand(22, generator=g, dtype=torch.float64).tolist()
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * t + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return min(int(u[20] * (height - h + 1)), height - h), min(int(u[21] * (width - w + 1)), width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(img: torch.Tensor, size, interpolation: str = "bilinear") -> torch.Tensor:
    # bicubic overshoots: torchvision clamps a uint8 result to 0..255
    return TF.resize(img, size, interpolation=INTERPOLATIONS[interpolation], antialias=True)


@dataclass(frozen=True)
class Crop:
    """Where to cut, how large to make it and whether to mirror: one sample's training augmentation."""
    top: int
    left: int
    height: int
    width: int
    flip: bool
    size: int
    randaug: str = ""  # timm RandAugment config applied after the crop ("" = none; data.randaug)
    aug_seed: int = 0  # its seed, drawn from the sample's generator right after the crop
    interpolation: str = "bilinear"  # of the resize and of RandAugment (data.interpolation)

    def moved(self, top: int, left: int, height: int, width: int) -> "Crop":
        """The same augmentation of another window (a reduced decode's grid)."""
        return replace(self, top=top, left=left, height=height, width=width)


def train_crop(height: int, width: int, img_size: int, g: torch.Generator, crop_min_scale: float = 0.35,
               ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True, randaug: str = "",
               interpolation: str = "bilinear") -> Crop:
    """Draw RandomResizedCrop(img_size, scale=(crop_min_scale, 1), ratio) + flip (+ a RandAugment seed) for an image
    of this size. Only the size is needed, so the draw can happen where the image is not decoded
    (``data.decode_on``)."""
    top, left, h, w = random_resized_crop_params(height, width, (crop_min_scale, 1.0), ratio, g)
    flip = hflip and float(torch.rand((), generator=g)) < 0.5
    seed = int(torch.randint(2**62, (), generator=g)) if randaug else 0
    return Crop(top, left, h, w, flip, img_size, randaug, seed, interpolation)


def apply_crop(img: torch.Tensor, crop: Crop) -> torch.Tensor:
    """Cut, resize and mirror a decoded uint8 (3,H,W) image, on whatever device it is (a view in any memory
    layout: stack it or call ``.contiguous()``)."""
    out = _resize(img[:, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width], [crop.size, crop.size],
                  crop.interpolation)
    return finish_crop(out, crop)


def finish_crop(out: torch.Tensor, crop: Crop) -> torch.Tensor:
    """Mirror (and RandAugment) a cut and resized (3,S,S) image as ``crop`` says."""
    out = out.flip(-1) if crop.flip else out
    if crop.randaug:
        out = randaugment(out.contiguous(), crop.randaug, crop.aug_seed, crop.interpolation)
    # No .contiguous() here: the resize of a decoded JPEG's channels-last view already returns a channels-first
    # contiguous image (measured), and the rare crop that needs no resize stays a view that the batch's torch.stack
    # copies once, straight into the batch.
    return out


def train_transform(img: torch.Tensor, img_size: int, g: torch.Generator, crop_min_scale: float = 0.35,
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True, randaug: str = "",
                    interpolation: str = "bilinear") -> torch.Tensor:
    """RandomResizedCrop(img_size, scale=(crop_min_scale, 1), ratio) + random horizontal flip (+ RandAugment),
    uint8 in/out."""
    return apply_crop(img, train_crop(img.shape[-2], img.shape[-1], img_size, g, crop_min_scale, ratio, hflip,
                                      randaug, interpolation))


def eval_transform(img: torch.Tensor, img_size: int, crop_pct: float = EVAL_CROP_FRACTION,
                   interpolation: str = "bilinear") -> torch.Tensor:
    """Resize the shorter side to img_size / crop_pct, then centre-crop img_size x img_size (uint8 in/out)."""
    short = max(img_size, int(img_size / crop_pct))
    h, w = img.shape[-2:]
    if h <= w:
        size = [short, max(short, int(round(w * short / h)))]
    else:
        size = [max(short, int(round(h * short / w))), short]
    img = _resize(img, size, interpolation)
    top, left = (size[0] - img_size) // 2, (size[1] - img_size) // 2
    return img[:, top:top + img_size, left:left + img_size].contiguous()


EVAL_VIEW_KEYS = ("eval_crop_pct", "interpolation")  # the data.* keys EvalTransform reads


@dataclass(frozen=True)
class EvalTransform:
    """How held-out images come to the model's size: ``data.eval_crop_pct`` and ``data.interpolation``."""
    crop_pct: float = EVAL_CROP_FRACTION
    interpolation: str = "bilinear"

    @classmethod
    def of_run(cls, data: Mapping[str, Any]) -> "EvalTransform":
        """A run's: from its ``data`` config (a dict; a run or file that predates a key gets its default)."""
        return cls(float(data.get("eval_crop_pct", EVAL_CROP_FRACTION)), str(data.get("interpolation", "bilinear")))

    def __call__(self, img: torch.Tensor, img_size: int) -> torch.Tensor:
        return eval_transform(img, img_size, self.crop_pct, self.interpolation)


def jpeg_size(data: bytes, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Optional[tuple[int, int]]:
    """(height, width) of an upright 8-bit JPEG from its header without decoding it; None for anything else (the
    worker decodes those). Raises :class:`TooLarge` over ``max_pixels``."""
    try:
        head = read_header(data, max_pixels)
    except TooLarge:
        raise
    except DecodeError:
        return None
    if head.format == "JPEG" and head.mode in ("RGB", "L", "CMYK") and head.orientation == 1:
        return head.height, head.width
    return None


@dataclass(frozen=True)
class DeferredJpeg:
    """A JPEG whose decode and crop were left to the training device (``data.decode_on=device``)."""
    data: torch.Tensor  # the file's bytes, uint8 (N,)
    crop: Crop


def materialize(images: Union[torch.Tensor, Sequence], device: Union[str, torch.device]
                ) -> tuple[torch.Tensor, int]:
    """A batch as the trainer needs it, uint8 (B,3,S,S) on ``device``, and how many of its samples could not be
    decoded. Deferred JPEGs are decoded there in one batched call (nvJPEG on a GPU; libjpeg-turbo on a CPU) and
    cropped with their pre-drawn ``Crop``; images the workers already decoded are moved as they are.

    A JPEG whose header was fine but whose data is not (the workers only read headers) falls back to the CPU
    decoders; if they fail too, another image of the batch takes its place so the batch keeps its size, and it
    is counted: one bad file must not stop a run."""
    if torch.is_tensor(images):
        return images.to(device, non_blocking=True), 0
    device = torch.device(device)
    deferred = [i for i, x in enumerate(images) if isinstance(x, DeferredJpeg)]
    decoded: list = []
    if deferred:
        datas = [images[i].data for i in deferred]
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for torchcodec)
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole batched call: decode them one by one
            decoded = [_decode_or_none(d, device) for d in datas]
    out = [x.to(device, non_blocking=True) if torch.is_tensor(x) else None for x in images]
    for i, img in zip(deferred, decoded):
        out[i] = apply_crop(img, images[i].crop) if img is not None else None
    good = [x for x in out if x is not None]
    if not good:
        raise DecodeError(f"none of the {len(out)} images of a batch could be decoded")
    bad = [i for i, x in enumerate(out) if x is None]
    for k, i in enumerate(bad):
        out[i] = good[k % len(good)]
    return torch.stack(out), len(bad)


def _decode_or_none(data: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    try:
        return decode(bytes(data.numpy())).to(device)
    except DecodeError as e:
        warnings.warn(f"vitscale.data: skipping an undecodable JPEG ({e})", stacklevel=3)
        return None
