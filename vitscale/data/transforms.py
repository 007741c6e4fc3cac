"""Decode and augment images as uint8 tensors. All randomness comes from an explicit ``torch.Generator``.

Batches stay uint8 (B,3,H,W) through the DataLoader (4x less inter-process traffic than float); the trainer calls
:func:`normalize` on the device.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
# Imported here (not per call) so DataLoader workers forked from the trainer inherit them ready to use.
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875


class DecodeError(ValueError):
    """The bytes are not a readable image."""


def _decode_pil(data: bytes) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode(data: bytes) -> torch.Tensor:
    """Image bytes (PNG/JPEG/WebP/...) -> uint8 tensor (3,H,W), RGB. Grayscale is repeated to 3 channels, alpha
    dropped. Uses torchvision's decoder, falling back to PIL; raises :class:`DecodeError` if neither can read it."""
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for torchcodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception as e_tv:
        try:
            img = _decode_pil(data)
        except Exception as e_pil:
            raise DecodeError(f"cannot decode image ({len(data)} bytes): {e_pil or e_tv}") from None
    if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
        raise DecodeError(f"unexpected decoded image shape {tuple(img.shape)}")
    return img


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                               g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in ``scale`` and aspect ratio in ``ratio``
    (the Inception crop); falls back to a centre crop clamped to ``ratio`` after 10 tries."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, 0, height - h), _randint(g, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(img: torch.Tensor, size) -> torch.Tensor:
    return TF.resize(img, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


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


def train_crop(height: int, width: int, img_size: int, g: torch.Generator, crop_min_scale: float = 0.35,
               ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True, randaug: str = "") -> Crop:
    """Draw RandomResizedCrop(img_size, scale=(crop_min_scale, 1), ratio) + flip (+ a RandAugment seed) for an image
    of this size. Only the size is needed, so the draw can happen where the image is not decoded
    (``data.decode_on``)."""
    top, left, h, w = random_resized_crop_params(height, width, (crop_min_scale, 1.0), ratio, g)
    flip = hflip and float(torch.rand((), generator=g)) < 0.5
    seed = int(torch.randint(2**62, (), generator=g)) if randaug else 0
    return Crop(top, left, h, w, flip, img_size, randaug, seed)


def apply_crop(img: torch.Tensor, crop: Crop) -> torch.Tensor:
    """Cut, resize and mirror a decoded uint8 (3,H,W) image, on whatever device it is."""
    out = _resize(img[:, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width], [crop.size, crop.size])
    out = (out.flip(-1) if crop.flip else out).contiguous()
    if crop.randaug:
        from vitscale.data.augment import randaugment

        out = randaugment(out, crop.randaug, crop.aug_seed)
    return out


def train_transform(img: torch.Tensor, img_size: int, g: torch.Generator, crop_min_scale: float = 0.35,
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True, randaug: str = "") -> torch.Tensor:
    """RandomResizedCrop(img_size, scale=(crop_min_scale, 1), ratio) + random horizontal flip (+ RandAugment),
    uint8 in/out."""
    return apply_crop(img, train_crop(img.shape[-2], img.shape[-1], img_size, g, crop_min_scale, ratio, hflip,
                                      randaug))


def eval_transform(img: torch.Tensor, img_size: int, crop_pct: float = EVAL_CROP_FRACTION) -> torch.Tensor:
    """Resize the shorter side to img_size / crop_pct, then centre-crop img_size x img_size (uint8 in/out)."""
    short = max(img_size, int(img_size / crop_pct))
    h, w = img.shape[-2:]
    if h <= w:
        size = [short, max(short, int(round(w * short / h)))]
    else:
        size = [max(short, int(round(h * short / w))), short]
    img = _resize(img, size)
    top, left = (size[0] - img_size) // 2, (size[1] - img_size) // 2
    return img[:, top:top + img_size, left:left + img_size].contiguous()


def normalize(images: torch.Tensor, device=None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B,3,H,W) or (3,H,W) -> float32 normalised with ImageNet mean/std, moved to ``device`` first
    (so the 4x larger float tensor is only made there)."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    x = images.float().div_(255.0)
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return x.sub_(m).div_(s)


def jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    """(height, width) from a JPEG's header without decoding it, or None if the bytes are not a readable JPEG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return (im.height, im.width) if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK") else None
    except (UnidentifiedImageError, OSError, ValueError):
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
