"""Rebuilding a model from a timm state dict that carries no vitscale metadata (`vitscale eval --model NAME`): what
the tensors say is inferred from them, what they do not say is asked for in one line, never guessed."""
import pytest
import torch

from vitscale.weights import WeightsError, load_model
from vitscale.weights.load import _infer_model_cfg

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _timm(**kw):
    import timm.models.vision_transformer as timm_vit

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    args.update(kw)
    model = timm_vit.VisionTransformer(**args).eval()
    with torch.no_grad():  # away from the init, so that a lost or misread tensor shows in the outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _max_diff(ours, theirs) -> float:
    with torch.no_grad():
        return (ours(X) - theirs(X)).abs().max().item()


def test_head_count_is_never_guessed_from_the_width(tmp_path):
    """96 wide with 2 heads of 48 under --model vit_micro_patch4 (128 wide): the old width // 64 guess built a 1-head
    network whose logits were 4.9 off. Refused unless given; given, the outputs are timm's."""
    theirs = _timm(embed_dim=96, num_heads=2)
    path = tmp_path / "heads96x2.pth"
    torch.save(theirs.state_dict(), path)
    with pytest.raises(WeightsError, match=r"96 wide but vit_micro_patch4 is 128 wide.*pass --num-heads N$"):
        load_model(path, model_name="vit_micro_patch4")
    with pytest.raises(WeightsError, match="--num-heads 5 does not divide the weights' width 96"):
        load_model(path, model_name="vit_micro_patch4", num_heads=5)
    model, info = load_model(path, model_name="vit_micro_patch4", num_heads=2)
    assert info["num_heads"] == 2 and _max_diff(model, theirs) <= 1e-5


def test_analyze_takes_the_head_count_too(tmp_path):
    """vitscale analyze refused such a file telling the user to pass --num-heads, which it did not have."""
    from vitscale.analysis.run import analyze
    from vitscale.cli import build_parser

    theirs = _timm(embed_dim=96, num_heads=2)
    torch.save(theirs.state_dict(), tmp_path / "heads96x2.pth")
    with pytest.raises(WeightsError, match="pass --num-heads N$"):
        analyze(tmp_path / "heads96x2.pth", out=tmp_path / "a", model_name="vit_micro_patch4", only=["pos_embed"])
    doc = analyze(tmp_path / "heads96x2.pth", out=tmp_path / "b", model_name="vit_micro_patch4", num_heads=2,
                  only=["pos_embed"], log=lambda line: None)
    assert doc["model"]["num_heads"] == 2
    parser = build_parser()
    assert parser.parse_args(["analyze", "m.pth", "--out", "o", "--num-heads", "2"]).num_heads == 2


def test_a_registered_width_names_its_variant_and_qk_norm_gives_the_head_count(tmp_path):
    import timm.models.vision_transformer as timm_vit

    with torch.device("meta"):  # ViT-H/14's shapes at no cost
        huge = timm_vit.VisionTransformer(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16)
    with pytest.raises(WeightsError, match=r"pass --num-heads N or --model vit_huge_patch14 \(16 heads\)$"):
        _infer_model_cfg(huge.state_dict(), "vit_large_patch14")  # the old guess: 20 heads
    theirs = _timm(embed_dim=96, num_heads=2, qk_norm=True)  # q_norm is head_dim (48) wide: 2 heads, exactly
    torch.save(theirs.state_dict(), tmp_path / "qk.pth")
    model, info = load_model(tmp_path / "qk.pth", model_name="vit_micro_patch4")
    assert info["num_heads"] == 2 and _max_diff(model, theirs) <= 1e-5


@pytest.mark.parametrize("options", [
    dict(class_token=False, global_pool="avg"), dict(global_pool="avg"),
    dict(init_values=0.1), dict(mlp_ratio=2.0), dict(qkv_bias=False),
    dict(class_token=False, global_pool="avg", init_values=1e-5, mlp_ratio=3.0, qkv_bias=False, reg_tokens=4,
         qk_norm=True)])
def test_what_a_timm_file_says_is_read_from_its_keys(options, tmp_path):
    """No [CLS] (avg pooling), fc_norm, LayerScale, another MLP width, no qkv bias: each was a raw RuntimeError
    traceback or "weights do not match model"; now the network rebuilt is timm's, output for output."""
    theirs = _timm(embed_dim=128, num_heads=4, **options)
    torch.save({"model": theirs.state_dict()}, tmp_path / "timm.pth")
    model, info = load_model(tmp_path / "timm.pth", model_name="vit_micro_patch4")
    assert info["num_classes"] == theirs.num_classes and info["num_prefix_tokens"] == theirs.num_prefix_tokens
    assert _max_diff(model, theirs) <= 1e-5


def test_a_file_that_does_not_fit_is_one_line_naming_the_keys(tmp_path):
    """A position table of no square grid (62 patch rows beside a [CLS]) gives no image size to infer (so the
    variant's 224 px stays); torch's RuntimeError traceback is now one line naming the tensor and both shapes."""
    sd = _timm(embed_dim=128, num_heads=4).state_dict()
    sd["pos_embed"] = sd["pos_embed"][:, :63]
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match=r"odd.pth: the weights \(as vit_micro_patch4\) do not fit the model: "
                                           r"shape mismatch pos_embed \(1, 63, 128\) vs \(1, 3137, 128\)$"):
        load_model(tmp_path / "odd.pth", model_name="vit_micro_patch4")


@pytest.mark.parametrize("class_token", [True, False])
def test_timms_no_embed_class_register_layout_loads_without_metadata(tmp_path, class_token):
    """timm's *_reg4_* models and DeiT-III keep position rows for the patches only: the image size was read as the
    default 224 px ('shape mismatch pos_embed (1, 64, 64) vs ...'). Now the prefix tokens get zero rows, as
    model.init's fitting gives them, and the logits are timm's."""
    kw = dict(reg_tokens=4, no_embed_class=True, class_token=class_token)
    theirs = _timm(**kw, **({} if class_token else {"global_pool": "avg"}))
    path = tmp_path / "reg4.pth"
    torch.save(theirs.state_dict(), path)
    model, info = load_model(path, model_name="vit_micro_patch4", num_heads=2)
    assert info["img_size"] == [32, 32] and info["num_prefix_tokens"] == 4 + class_token
    assert _max_diff(model, theirs) <= 1e-5
