"""Reduced-size JPEG decoding for training crops (data/reduced_decode.py: 1/4 and 1/8 scale): the same crop as a
full decode, within PSNR 35 dB of decode-then-resize on real photos, and less CPU."""
import io
import math
import time

import numpy as np
import pytest
import torch

from vitscale.data.reduced_decode import DRAFT_THRESHOLDS, draft_scale, train_image
from vitscale.data.transforms import Crop, decode, train_transform

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def _jpeg(name: str, quality: int = 90) -> bytes:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(getattr(skimage.data, name)())[:, :, :3]).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def test_scale_thresholds():
    assert [draft_scale(Crop(0, 0, side, side + 50, False, 32)) for side in (63, 64, 191, 192, 383, 384, 4000)] == \
        [1, 1, 1, 4, 4, 8, 8]
    assert [r for r, _ in DRAFT_THRESHOLDS] == [8, 4]


@pytest.mark.parametrize("img_size", [24, 48])
def test_reduced_decode_is_within_35_db_of_decode_then_resize_on_photos(img_size):
    worst, reduced = math.inf, 0
    for name in PHOTOS:
        data = _jpeg(name)
        full = decode(data)
        for seed in range(12):
            # the same generator state: the same crop, flip (and RandAugment seed) as the full decode's
            got = train_image(data, img_size, torch.Generator().manual_seed(seed), 0.08)
            want = train_transform(full, img_size, torch.Generator().manual_seed(seed), 0.08)
            assert got.shape == want.shape == (3, img_size, img_size) and got.dtype == torch.uint8
            score = _psnr(got, want)
            reduced += score != math.inf  # identical output: the crop was under 2x, decoded in full
            worst = min(worst, score)
    assert reduced >= 12, f"only {reduced} of {12 * len(PHOTOS)} crops were decoded reduced: the test tests little"
    assert worst >= 35.0, f"worst PSNR {worst:.1f} dB"


def test_png_rotated_and_small_crops_take_the_full_decode():
    from PIL import Image

    img = np.asarray(__import__("skimage.data").data.astronaut())
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    for data, size in ((buf.getvalue(), 32), (_jpeg("astronaut"), 400)):
        got = train_image(data, size, torch.Generator().manual_seed(0))
        want = train_transform(decode(data), size, torch.Generator().manual_seed(0))
        assert torch.equal(got, want)


def test_reduced_decode_costs_less_cpu():
    data = _jpeg("hubble_deep_field")  # 872 x 1000: crops of 400-1000 px, output 64: 1/4 and 1/8 scale

    def cpu(fn) -> float:
        best = math.inf
        for _ in range(3):
            t0 = time.process_time()
            for seed in range(8):
                fn(torch.Generator().manual_seed(seed))
            best = min(best, time.process_time() - t0)
        return best

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = cpu(lambda g: train_transform(decode(data), 64, g))
        reduced = cpu(lambda g: train_image(data, 64, g))
    finally:
        torch.set_num_threads(torch_threads)
    # measured 0.6-0.7x (entropy decoding of the whole file remains); CPU time, so a busy machine skews it less
    assert reduced < 0.85 * full, (reduced, full)
