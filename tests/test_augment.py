"""Fine-tuning augmentations come from timm's library: for the same seed, vitscale's result is the library's own;
and they are a pure function of the data stream (exact resume with all of them on)."""
import random

import numpy as np
import pytest
import torch

from conftest import run_cli, train_args
from vitscale.config.load import load_config
from vitscale.data.augment import BatchAugment, batch_augment_from_config, randaug_transform, randaugment, seeded
from vitscale.data.transforms import train_transform
from vitscale.errors import ConfigError
from vitscale.logging.metrics import read_metrics

RANDAUG = "rand-m9-mstd0.5-inc1"


def test_randaugment_is_timms_for_the_same_seed_and_leaves_global_rngs_alone():
    from timm.data import create_transform
    from torchvision.transforms.v2 import functional as TF

    # timm's own training transform for this size carries the RandAugment we call (same hyper-parameters)
    theirs_tf = next(t for t in create_transform(32, is_training=True, auto_augment=RANDAUG).transforms
                     if type(t).__name__ == "RandAugment")
    ours_tf = randaug_transform(RANDAUG, 32)
    assert [(o.name, o.magnitude, o.hparams) for o in ours_tf.ops] == [(o.name, o.magnitude, o.hparams)
                                                                       for o in theirs_tf.ops]
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    crop = torch.stack([x * 8, y * 8, (x + y) * 4]).clamp(0, 255).to(torch.uint8)  # a gradient: most ops show
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    seeded_torch = []
    real_seed = torch.manual_seed
    torch.manual_seed = lambda s: seeded_torch.append(s) or real_seed(s)  # reaches every CUDA generator too
    try:
        outs = [randaugment(crop, RANDAUG, seed) for seed in range(8)]
    finally:
        torch.manual_seed = real_seed
    assert seeded_torch == []  # in the trainer (decode_on=device) it would reseed dropout's CUDA generator
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    for seed, out in enumerate(outs):
        random.seed(seed)
        np.random.seed(seed)
        assert torch.equal(out, TF.pil_to_tensor(theirs_tf(TF.to_pil_image(crop)))), seed
    assert torch.equal(randaugment(crop, RANDAUG, 1), outs[1])
    assert len({o.numpy().tobytes() for o in outs if not torch.equal(o, crop)}) >= 2  # it does augment
    # in the sample transform: crop + flip, then RandAugment seeded from the sample's generator
    from vitscale.data.transforms import train_crop

    big = torch.nn.functional.interpolate(crop[None].float(), size=(40, 48), mode="bilinear")[0].to(torch.uint8)
    changed = 0
    for seed in range(4):
        plain = train_transform(big, 32, torch.Generator().manual_seed(seed), 0.5)
        augmented = train_transform(big, 32, torch.Generator().manual_seed(seed), 0.5, randaug=RANDAUG)
        drawn = train_crop(40, 48, 32, torch.Generator().manual_seed(seed), 0.5, randaug=RANDAUG)
        assert torch.equal(augmented, randaugment(plain, RANDAUG, drawn.aug_seed))  # same crop, then RandAugment
        changed += not torch.equal(plain, augmented)
    assert changed >= 1


class _Data:
    batch_size, random_erasing, mixup, cutmix, mixup_prob, mixup_switch_prob = 8, 0.25, 0.8, 1.0, 1.0, 0.5


@pytest.mark.parametrize("switch", [0.0, 1.0])  # all Mixup, all CutMix
def test_mixup_cutmix_and_erasing_are_timms_for_the_same_seed(switch):
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing

    data = _Data()
    data.mixup_switch_prob = switch
    aug = BatchAugment(data, num_classes=10, label_smoothing=0.1, seed=0, rank=0)
    images = torch.randn(8, 3, 16, 16)
    labels = torch.arange(8) % 10
    stream = {"worker": 0, "epoch": 1, "item": 2, "offset": 40, "seen": 140, "skipped": 0, "bad_shards": []}
    ours_x, ours_y = aug(images.clone(), labels, stream)
    with seeded(aug.batch_seed(stream)):
        x = RandomErasing(probability=0.25, mode="pixel", max_count=1, device="cpu")(images.clone())
        x, y = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=switch, label_smoothing=0.1,
                     num_classes=10)(x, labels)
    assert torch.equal(ours_x, x) and torch.equal(ours_y, y)
    assert ours_y.shape == (8, 10) and torch.allclose(ours_y.sum(-1), torch.ones(8))
    other_x, _ = aug(images.clone(), labels, {**stream, "offset": 48})
    assert not torch.equal(other_x, ours_x)  # another batch, other draws


def _seeds(loader, batches=12):
    aug = BatchAugment(_Data(), num_classes=10, label_smoothing=0.0, seed=0, rank=0)
    it = iter(loader)
    return [aug.batch_seed(next(it)["stream"]) for _ in range(batches)]


def test_every_batch_of_a_real_stream_gets_its_own_mixing_draws(tmp_path):
    """The seed comes from what the loaders put in a batch's stream: with one source, blocks whose sample count is
    a multiple of the batch repeated their draws (the position within a block restarts); with a mix, every batch of
    a worker had one seed for the whole run (one lambda, one CutMix box, one erased rectangle)."""
    import io
    import tarfile

    from PIL import Image
    from sklearn.datasets import load_digits

    from vitscale.data.mix import build_mix_loader
    from vitscale.data.pipeline import build_train_loader
    from vitscale.config.sources import Source

    images = (load_digits().images * 255 / 16).astype(np.uint8)
    urls = []
    for s in range(8):  # 8 shards of 16 real digits, plain tarfile; blocks of 2 shards = 32 samples = 4 batches
        urls.append(str(tmp_path / f"d-{s}.tar"))
        with tarfile.open(urls[-1], "w") as tar:
            for i in range(16):
                buf = io.BytesIO()
                Image.fromarray(images[s * 16 + i]).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", b"1")):
                    info = tarfile.TarInfo(f"k{s}_{i:02d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    kw = dict(batch_size=8, img_size=8, seed=1, rank=0, world_size=1, num_workers=0, shards_in_flight=2,
              shuffle_buffer=8)
    one = _seeds(build_train_loader(urls, **kw))
    assert len(set(one)) == len(one), one
    mix = build_mix_loader([(Source("a", "", 0.5), urls[:4]), (Source("b", "", 0.5), urls[4:])], **kw)
    got = _seeds(mix)
    assert len(set(got)) == len(got), got


def test_bad_augmentation_keys_are_one_line():
    cfg = load_config(None, ["data.randaug=rand-m9-q3", "objective.name=supervised"])
    with pytest.raises(ConfigError, match="data.randaug=.rand-m9-q3. is not a valid RandAugment string"):
        batch_augment_from_config(cfg, 10, 0, classifier=True)
    cfg = load_config(None, ["data.mixup=0.8", "data.batch_size=7"])
    with pytest.raises(ConfigError, match="even data.batch_size"):
        batch_augment_from_config(cfg, 10, 0, classifier=True)


AUG = ["data.randaug=rand-m9-mstd0.5-inc1", "data.mixup=0.8", "data.cutmix=1.0", "data.random_erasing=0.25",
       "objective.label_smoothing=0.1"]


def test_kill_and_resume_is_exact_with_every_augmentation_on(tmp_path, data_cache):
    steps = ["train.steps=6", "train.ckpt_every=3", "data.num_workers=1", *AUG]
    straight = run_cli(train_args(tmp_path, "straight", data_cache, *steps), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = run_cli(train_args(tmp_path, "resumed", data_cache, *steps), cwd=tmp_path,
                      env_extra={"VITSCALE_FAULT": "kill@after_step,step=4"})
    assert crashed.returncode != 0
    resumed = run_cli(train_args(tmp_path, "resumed", data_cache, *steps), cwd=tmp_path)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    a, b = ({r["step"]: r["loss"] for r in read_metrics(tmp_path / n / "metrics.jsonl") if "loss" in r}
            for n in ("straight", "resumed"))
    assert all(b[s] == a[s] for s in range(4, 7)), (a, b)
    plain = run_cli(train_args(tmp_path, "plain", data_cache, "train.steps=2", "data.num_workers=1"), cwd=tmp_path)
    p = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "plain" / "metrics.jsonl") if "loss" in r}
    assert plain.returncode == 0 and p[2] != a[2]  # the augmentations did change the batches


def test_device_decode_applies_the_same_randaugment_as_worker_decode():
    """data.decode_on=device: the worker only draws the crop (and the RandAugment seed) from the JPEG's header;
    the trainer decodes and augments. The image is the one worker decoding gives."""
    import io

    from PIL import Image

    from vitscale.data.transforms import DeferredJpeg, decode, jpeg_size, materialize, train_crop

    y, x = torch.meshgrid(torch.arange(48), torch.arange(56), indexing="ij")
    arr = torch.stack([x * 4, y * 5, (x + y) * 2]).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    for seed in range(3):
        worker = train_transform(decode(data), 32, torch.Generator().manual_seed(seed), 0.5, randaug=RANDAUG)
        crop = train_crop(*jpeg_size(data), 32, torch.Generator().manual_seed(seed), 0.5, randaug=RANDAUG)
        device, bad = materialize([DeferredJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), crop)], "cpu")
        assert bad == 0 and torch.equal(device[0], worker), seed
