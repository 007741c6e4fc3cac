"""data.interpolation: every resize (training crops, RandAugment, held-out images) interpolates as the run says, and
`vitscale eval` / `export --timm` see held-out images the way the run did (data.eval_crop_pct too)."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vitscale.data.augment import randaug_transform
from vitscale.data.pipeline import build_train_loader
from vitscale.data.transforms import EvalTransform, eval_transform
from vitscale.models import create_model
from vitscale.weights import load_model

PIL_MODES = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _photo(name: str = "chelsea") -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _pil_eval(arr: np.ndarray, img_size: int, crop_pct: float, mode: str) -> torch.Tensor:
    """timm's eval transform written with PIL alone: shorter side to img_size / crop_pct, centre crop."""
    h, w = arr.shape[:2]
    short = int(img_size / crop_pct)
    size = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    out = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), PIL_MODES[mode])).astype(np.int32)
    top, left = (size[0] - img_size) // 2, (size[1] - img_size) // 2
    return torch.from_numpy(out[top:top + img_size, left:left + img_size]).permute(2, 0, 1)


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_eval_resize_is_pils_in_either_mode(name):
    """Our antialiased resize of a photograph is PIL's to within one level in both modes, and the two modes differ
    (a key that changed nothing would pass the first check alone)."""
    arr = _photo(name)
    img = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    for mode in PIL_MODES:
        ours = eval_transform(img, 224, 224 / 256, mode).int()
        assert (ours - _pil_eval(arr, 224, 224 / 256, mode)).abs().max() <= 1, mode
    other = (eval_transform(img, 224, 224 / 256, "bicubic").int() - _pil_eval(arr, 224, 224 / 256, "bilinear"))
    assert other.abs().max() >= 10


def test_randaugment_geometry_uses_the_runs_interpolation():
    for mode, pil in PIL_MODES.items():
        ops = randaug_transform("rand-m9-mstd0.5-inc1", 224, mode).ops
        resamples = {op.kwargs["resample"] for op in ops if "resample" in op.kwargs}
        assert resamples == {pil}, (mode, resamples)


def _jpeg_shard(path, names=("chelsea", "coffee", "astronaut", "rocket")):
    """A shard written with plain tarfile: 2 JPEG photographs per name, with labels."""
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(n for n in names for _ in range(2)):
            buf = io.BytesIO()
            Image.fromarray(_photo(name)).save(buf, format="JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("reduced_decode", [True, False])
def test_training_crops_use_the_runs_interpolation(tmp_path, reduced_decode):
    """Same seed, same crops and flips: the two modes give the same samples, close in value but not equal."""
    url = _jpeg_shard(tmp_path / "s.tar")
    batches = {}
    for mode in PIL_MODES:
        loader = build_train_loader([url], batch_size=8, img_size=64, seed=3, rank=0, world_size=1, num_workers=0,
                                    crop_min_scale=0.08, interpolation=mode, reduced_decode=reduced_decode)
        batches[mode] = next(iter(loader))
    a, b = (batches[m]["image"].int() for m in PIL_MODES)
    assert batches["bilinear"]["key"] == batches["bicubic"]["key"]
    diff = (a - b).abs().float()
    assert diff.max() >= 10 and diff.mean() < 6, (float(diff.max()), float(diff.mean()))


def _fake_run(root, data_cfg, **model_options):
    """A ZeRO-0 run directory as the trainer writes it, whose data section is DATA_CFG."""
    torch.manual_seed(0)
    model = create_model("vit_micro_patch4", img_size=32, num_classes=10, **model_options)
    with torch.no_grad():  # away from the init: a misread option shows in the outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ck = root / "checkpoints" / "step_00000003"
    ck.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, ck / "mp_rank_00_model_states.pt")
    cfg = {"model": {"name": "vit_micro_patch4", "img_size": 32, "num_classes": 10, **model_options},
           "objective": {"name": "supervised"}, "data": data_cfg}
    (ck / "trainer_state.json").write_text(json.dumps({"step": 3, "config": cfg}))
    (ck / "COMPLETE").write_text(json.dumps({"step": 3, "files": {p.name: p.stat().st_size for p in ck.iterdir()}}))
    (ck.parent / "latest").write_text(ck.name + "\n")
    return root


def test_eval_and_exports_see_held_out_images_as_the_run_did(tmp_path):
    from vitscale.cli import main
    from vitscale.eval.run import EvalOptions, _Session

    run = _fake_run(tmp_path / "run", {"eval_crop_pct": 1.0, "interpolation": "bicubic", "batch_size": 8})
    want = EvalTransform(1.0, "bicubic")
    assert EvalTransform.of_run(load_model(run)[1]["data_config"]) == want
    assert main(["export", str(run), str(tmp_path / "w.safetensors")]) == 0
    info = load_model(tmp_path / "w.safetensors")[1]
    assert EvalTransform.of_run(info["data_config"]) == want  # the file carries the run's eval keys
    assert main(["export", str(run), str(tmp_path / "timm"), "--timm"]) == 0
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert (cfg["crop_pct"], cfg["interpolation"]) == (1.0, "bicubic")
    folder = load_model(tmp_path / "timm")[1]  # the folder loads without --model: its config.json names it
    assert folder["num_classes"] == 10 and EvalTransform.of_run(folder["data_config"]) == want
    # vitscale eval: the run's transform, unless its flags say otherwise; a run that predates the keys: the defaults
    session = _Session(str(run), EvalOptions(), None, print, None, info, None, None, 10, {})
    assert session.view == want
    session.opts = EvalOptions(crop_pct=0.9)
    assert session.view == EvalTransform(0.9, "bicubic")
    session.info = {**info, "data_config": {}}
    assert session.view == EvalTransform(0.9, "bilinear")


def test_eval_flags_refuse_what_is_not_a_transform(tmp_path, capsys):
    from vitscale.cli import main

    for flag, value, words in (("--crop-pct", "0", "(0, 1]"), ("--crop-pct", "x", "(0, 1]"),
                               ("--interpolation", "nearest", "bicubic")):
        with pytest.raises(SystemExit):
            main(["eval", "accuracy", str(tmp_path), flag, value])
        err = capsys.readouterr().err
        assert flag in err and words in err, err


@pytest.mark.parametrize("with_args", [False, True])
def test_a_timm_hub_folder_loads_without_model_and_evaluates_as_its_config_says(tmp_path, with_args):
    """A folder timm's own save_for_hf wrote (what `export --timm` writes too): config.json's architecture and
    model_args stand in for --model / --num-heads, its pretrained_cfg for the eval transform; the model computes
    what timm's does."""
    import timm
    from timm.models._hub import save_for_hf

    args = dict(img_size=32, num_classes=5, embed_dim=96, num_heads=2) if with_args else dict(img_size=32,
                                                                                                 num_classes=5)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    theirs.pretrained_cfg = {**theirs.pretrained_cfg, "crop_pct": 0.95, "interpolation": "bicubic"}
    save_for_hf(theirs, str(tmp_path / "hub"), model_args=args if with_args else None, safe_serialization=True)
    model, info = load_model(tmp_path / "hub")
    assert info["num_heads"] == (2 if with_args else 3) and info["embed_dim"] == (96 if with_args else 192)
    assert EvalTransform.of_run(info["data_config"]) == EvalTransform(0.95, "bicubic")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - theirs(x)).abs().max() <= 1e-5


def test_a_timm_folder_keeps_the_pooling_its_config_json_states(tmp_path):
    """[CLS] + average pooling without fc_norm has the keys of [CLS] pooling: the folder loaded as token pooling
    (logits 2.5 off) although config.json's model_args said avg."""
    from vitscale.cli import main

    run = _fake_run(tmp_path / "run", {}, global_pool="avg", fc_norm=False)
    assert main(["export", str(run), str(tmp_path / "timm"), "--timm"]) == 0
    trained, _ = load_model(run)
    folder, info = load_model(tmp_path / "timm")
    assert (folder.global_pool, info["num_classes"]) == ("avg", 10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (folder(x) - trained(x)).abs().max() <= 1e-5


def test_a_resume_that_changes_how_images_are_made_says_so(tmp_path):
    """A run written before data.interpolation existed (bilinear) relaunched with a recipe that now says bicubic
    switched mid-run without a word."""
    from conftest import DEMO
    from vitscale.config.load import config_to_dict, load_config
    from vitscale.distributed.checkpoint import CheckpointManager
    from vitscale.train.resume import find_resume

    old = config_to_dict(load_config(DEMO))
    del old["data"]["interpolation"]  # as written before the key existed
    ck = tmp_path / "checkpoints" / "step_00000004"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 4, "config": old}))
    (ck / "COMPLETE").write_text(json.dumps({"step": 4, "files": {"trainer_state.json":
                                                                  (ck / "trainer_state.json").stat().st_size}}))
    point = find_resume(CheckpointManager(tmp_path / "checkpoints", 0, 2),
                        load_config(DEMO, ["data.interpolation=bicubic"]))
    assert point.notes == ["resuming with other image settings than the checkpoint's (data.interpolation='bilinear' "
                           "there, 'bicubic' here): this config's apply from step 5"]
    assert find_resume(CheckpointManager(tmp_path / "checkpoints", 0, 2), load_config(DEMO)).notes == []
