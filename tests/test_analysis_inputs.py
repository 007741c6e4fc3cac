"""vitscale analyze: which query row the maps use, its inputs (images, options) and their one-line errors. Tiny random
models, nothing trained."""
import inspect
import json

import pytest
import torch

from vitscale.analysis.attention import attention_rollout, query_attention_to_patches, rollout_to_patches
from vitscale.models import create_model

MODEL_CFG = dict(name="vit_micro_patch4", img_size=32, patch_size=None, embed_dim=None, depth=None, num_heads=None,
                 global_pool="token", drop_path=0.0, grad_checkpointing=False)


def _export(model, path, objective="supervised", part="full", **cfg):
    """What `vitscale export` writes: fp32 tensors + model config, objective and part in the metadata."""
    from safetensors.torch import save_file

    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"vitscale_model": json.dumps(dict(MODEL_CFG, **cfg)),
                                       "vitscale_objective": objective, "vitscale_part": part, "step": "7"})
    return path


def _maps(model, x):
    with torch.no_grad():
        return model.get_attention_maps(x)


# ----- which query row: the one the classifier reads ------------------------------------------------------------
def test_avg_pool_model_with_cls_rolls_out_the_patch_mean_not_the_unused_cls_row(tmp_path):
    """[CLS] token + global_pool=avg (the MAE fine-tuning recipes): the head reads the patch mean, so the maps are
    the mean over patch rows and a note says why. The [CLS] row was used (5% off on this random model)."""
    from vitscale.analysis.images import load_images
    from vitscale.analysis.run import analyze
    from vitscale.pixels import normalize

    torch.manual_seed(0)
    model = create_model("vit_micro_patch4", img_size=32, num_classes=10, global_pool="avg").eval()
    assert model.has_class_token
    path = _export(model, tmp_path / "m.safetensors", global_pool="avg")
    lines = []
    doc = analyze(path, [], tmp_path / "out", only=["rollout", "layers"], log=lines.append, device="cpu")
    x = normalize(load_images([], (32, 32))[0][:1])
    maps = _maps(model, x)
    rollout = attention_rollout(maps, 1)
    want = rollout_to_patches(rollout, 1, (8, 8), has_cls=False)[0]
    unused = rollout_to_patches(rollout, 1, (8, 8), has_cls=True)[0]
    got = torch.tensor(doc["attention"]["rollout"]["astronaut"]["map"])
    assert torch.allclose(got, want, atol=1e-6) and float((got - unused).abs().max()) > 1e-4  # values ~1/64
    layer0 = torch.tensor(doc["attention"]["layer_attention_head"]["astronaut"][0]["map"])
    assert torch.allclose(layer0, query_attention_to_patches(maps[0], 1, (8, 8), 0, has_cls=False)[0], atol=1e-5)
    assert any("global_pool=avg" in n and "mean over all patch queries" in n for n in doc["notes"]), doc["notes"]
    # a [CLS]-pooled model keeps the [CLS] row and gets no note
    cls_doc = analyze(_export(create_model("vit_micro_patch4", img_size=32, num_classes=10), tmp_path / "c.safetensors"),
                      [], tmp_path / "out_cls", only=["rollout"], log=lambda s: None, device="cpu")
    assert cls_doc["notes"] == []


def test_public_query_maps_make_the_caller_say_whether_there_is_a_cls_row():
    """has_cls used to default to "[CLS] iff there is a prefix token": on a model with registers and no [CLS] that
    was register 0's row. Now it is a required keyword, and has_cls=True without a prefix token is refused."""
    for fn in (rollout_to_patches, query_attention_to_patches):
        param = inspect.signature(fn).parameters["has_cls"]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is inspect.Parameter.empty
    torch.manual_seed(0)
    m = create_model("vit_micro_patch8", img_size=32, class_token=False, global_pool="avg", reg_tokens=2).eval()
    rollout = attention_rollout(_maps(m, torch.randn(1, 3, 32, 32)), m.num_prefix_tokens)
    with pytest.raises(TypeError, match="has_cls"):
        rollout_to_patches(rollout, m.num_prefix_tokens, (4, 4))
    got = rollout_to_patches(rollout, m.num_prefix_tokens, (4, 4), has_cls=False)
    patch_mean = rollout[:, 2:, 2:].mean(dim=1)
    assert torch.allclose(got.flatten(1), patch_mean / patch_mean.sum(-1, keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="has_cls=True needs a prefix token"):
        rollout_to_patches(rollout[:, 2:, 2:], 0, (4, 4), has_cls=True)


# ----- images -----------------------------------------------------------------------------------------------------
def test_a_photo_stored_sideways_is_analysed_upright(tmp_path):
    """EXIF Orientation=6 (as phones write portrait photos): training decodes it upright, so analyze must too. The
    raw sideways pixels were analysed."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from vitscale.analysis.images import load_images, resize_center_crop

    upright = Image.fromarray(skimage.data.astronaut()[:, 64:448])  # portrait, 512 x 384: the crop differs
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    stored.save(tmp_path / "sideways.png", exif=exif)
    got, names = load_images([tmp_path / "sideways.png"], 32)
    want = torch.from_numpy(np.asarray(resize_center_crop(upright, 32)).copy()).permute(2, 0, 1)
    assert names == ["sideways"] and torch.equal(got[0], want)


def test_bad_inputs_are_one_line_before_the_model_is_read(tmp_path, capsys, monkeypatch):
    """Each was a traceback (or, for --num-filters 0, an empty figure; for --mask-ratio 1.5, another fraction
    masked): now one `vitscale: error:` line naming the problem, exit 2, and nothing written. The checkpoint does
    not exist, so every check here runs before the model is read."""
    from vitscale.cli import main

    monkeypatch.setenv("VITSCALE_DEBUG", "")
    (tmp_path / "bad.png").write_text("not an image")
    no_model = str(tmp_path / "no_model.safetensors")
    cases = [(["--num-filters", "0"], "--num-filters must be >= 1 (principal components drawn), got 0"),
             (["--num-filters", "-3"], "--num-filters must be >= 1 (principal components drawn), got -3"),
             (["--mask-ratio", "1.5"], "--mask-ratio must be in [0, 1) (the fraction of patches hidden), got 1.5"),
             (["--mask-ratio", "-0.2"], "--mask-ratio must be in [0, 1) (the fraction of patches hidden), got -0.2"),
             (["--device", "bogus"], "--device 'bogus' is not a device: use auto, cpu, cuda or cuda:N"),
             (["--device", "meta"], "--device meta: analyze runs on auto, cpu, cuda or cuda:N"),
             ([str(tmp_path / "bad.png")], f"{tmp_path / 'bad.png'} is not an image file PIL can read")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA GPU is available here (use --device cpu or auto)"))
    for i, (args, line) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(["analyze", no_model, *args, "--out", str(out)]) == 2, args
        assert capsys.readouterr().err == f"vitscale: error: {line}\n", args
        assert not out.exists() or not any(out.iterdir()), args


def test_mae_reconstruction_refuses_a_mask_ratio_outside_0_1():
    """The objective's own check (the Python API, or a ratio from the file): tokens_kept(64, 1.5) is -32, which
    masked another fraction of the patches without a word."""
    from types import SimpleNamespace

    from vitscale.errors import ConfigError
    from vitscale.objectives import objective_class

    run = SimpleNamespace(info={"part": "full", "objective_cfg": {"mask_ratio": 1.0}})
    for given in (1.5, -0.2, None):  # None: the file's own 1.0
        with pytest.raises(ConfigError, match=r"^--mask-ratio must be in \[0, 1\)"):
            objective_class("mae").analyze(run, given, 0, False)
