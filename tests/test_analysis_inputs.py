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
