"""The ViT paper's pre-training head (model.representation_size): a dense layer and tanh before the classifier
("pre-logits"), dropped for fine-tuning as the paper does, read from timm's older in21k files, counted in FLOPs."""
import pytest
import torch
import torch.nn.functional as F

from vitscale.config.load import load_config
from vitscale.errors import ConfigError
from vitscale.models import create_model
from vitscale.models.flops import linear_flops
from vitscale.weights import WeightsError, load_model
from vitscale.weights.fit import fit_state_dict
from vitscale.weights.init import copy_state

from conftest import DEMO

KW = dict(img_size=32, num_classes=10)


def test_the_head_is_two_layers_and_counted_in_flops():
    torch.manual_seed(0)
    model = create_model("vit_micro_patch4", representation_size=24, **KW).eval()
    plain = create_model("vit_micro_patch4", **KW)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.fc_norm(model.pool(tokens))
        hidden = model.forward_head(tokens, pre_logits=True)
        assert torch.allclose(hidden, torch.tanh(F.linear(pooled, model.pre_logits.fc.weight, model.pre_logits.fc.bias)))
        assert hidden.shape == (2, 24) and model(x).shape == (2, 10) and model.head.in_features == 24
    d = model.embed_dim
    assert model.forward_flops() - plain.forward_flops() == linear_flops(1, d, 24) + linear_flops(1, 24, 10) \
        - linear_flops(1, d, 10)
    assert load_config(DEMO, ["model.representation_size=24"]).model.representation_size == 24
    with pytest.raises(ConfigError, match="model.representation_size must be >= 1"):
        load_config(DEMO, ["model.representation_size=0"])


def test_fine_tuning_drops_the_two_layer_head_as_the_paper_does():
    torch.manual_seed(0)
    pretrained = create_model("vit_micro_patch4", representation_size=24, img_size=32, num_classes=21)
    target = create_model("vit_micro_patch4", **KW)
    fit = fit_state_dict(target, pretrained.state_dict())
    assert "pre-logits layer and head dropped" in fit.notes[0]
    assert sorted(fit.fresh) == ["head.bias", "head.weight"]
    copy_state(target, fit.state_dict)
    assert torch.equal(target.blocks[1].mlp.fc2.weight, pretrained.blocks[1].mlp.fc2.weight)
    same_classes = create_model("vit_micro_patch4", representation_size=24, **KW)  # the head would fit: still fresh
    assert "head.weight" in fit_state_dict(target, same_classes.state_dict()).fresh
    back = fit_state_dict(create_model("vit_micro_patch4", representation_size=24, **KW), target.state_dict())
    assert "pre-logits layer initialised (none in the source)" in back.notes


def test_a_timm_in21k_style_file_with_a_pre_logits_layer_loads_with_it(tmp_path):
    """timm's older in21k files carry pre_logits.fc: the width is read from it and the logits are the two-layer
    head's, computed here from timm's own features."""
    import timm.models.vision_transformer as timm_vit

    torch.manual_seed(0)
    theirs = timm_vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                                        num_classes=0).eval()
    sd = dict(theirs.state_dict())
    sd["pre_logits.fc.weight"], sd["pre_logits.fc.bias"] = torch.randn(32, 64) * 0.1, torch.randn(32) * 0.1
    sd["head.weight"], sd["head.bias"] = torch.randn(7, 32) * 0.1, torch.randn(7) * 0.1
    torch.save(sd, tmp_path / "in21k.pth")
    model, info = load_model(tmp_path / "in21k.pth", model_name="vit_micro_patch4", num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = theirs.forward_head(theirs.forward_features(x), pre_logits=True)
        want = F.linear(torch.tanh(F.linear(feats, sd["pre_logits.fc.weight"], sd["pre_logits.fc.bias"])),
                        sd["head.weight"], sd["head.bias"])
        assert (model(x) - want).abs().max() <= 1e-5
    assert info["model_cfg"]["representation_size"] == 32


def test_export_timm_refuses_a_pre_logits_layer_in_one_line(tmp_path):
    from vitscale.weights.timm_export import timm_model_args

    with pytest.raises(WeightsError, match="timm's ViT has no pre-logits layer"):
        timm_model_args(create_model("vit_micro_patch4", representation_size=24, **KW))
