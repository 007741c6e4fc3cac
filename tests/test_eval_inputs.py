"""`vitscale eval` on inputs that cannot work as given: one line `vitscale: error: ...` naming the problem, exit 2,
before any evaluation runs. The models are untrained timm files (no training here); the data is the bundled digits."""
import pytest
import torch

DATA = ["--model", "vit_micro_patch4", "--data", "demo:digits"]


def _timm(**kw):
    import timm.models.vision_transformer as timm_vit

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=128, depth=2, num_heads=4, num_classes=10)
    args.update(kw)
    return timm_vit.VisionTransformer(**args).eval()


def _main(argv, capsys):
    from vitscale.cli import main

    rc = main(argv)
    return rc, capsys.readouterr()


@pytest.mark.parametrize("evaluation", ["accuracy", "robustness"])
def test_a_head_with_fewer_classes_than_the_data_is_one_line(evaluation, tmp_path, data_cache, capsys, monkeypatch):
    """A 5-class head on the 10 digit classes was an IndexError traceback ("Target 8 is out of bounds")."""
    monkeypatch.setenv("VITSCALE_DEBUG", "")
    torch.save(_timm(num_classes=5).state_dict(), tmp_path / "cls5.pth")
    rc, cap = _main(["eval", evaluation, str(tmp_path / "cls5.pth"), *DATA, "--cache-dir", str(data_cache),
                     "--out", str(tmp_path / "out"), "--baseline", "none"], capsys)
    assert rc == 2 and cap.err.count("\n") == 1, cap.err
    assert cap.err.startswith(f"vitscale: error: {evaluation}: the checkpoint's head has 5 classes but the data has "
                              f"10 classes"), cap.err
    assert not (tmp_path / "out" / f"{evaluation}.json").exists()


def test_labels_beyond_the_head_are_one_line_even_when_no_manifest_counts_them(data_cache):
    """evaluate_classifier itself (also the trainer-free robustness path): a label the head has no logit for."""
    from vitscale.data.shards import resolve_shards
    from vitscale.eval.classify import evaluate_classifier
    from vitscale.eval.features import make_accelerator
    from vitscale.models import create_model

    val = resolve_shards("demo:digits:val", str(data_cache))
    model = create_model("vit_micro_patch4", img_size=32, embed_dim=64, depth=1, num_heads=2, num_classes=5)
    with pytest.raises(ValueError, match=r"^evaluation: the checkpoint's head has 5 classes but the data has label "
                                         r"[5-9]: evaluate it on data labelled 0\.\.4"):
        evaluate_classifier(model, val, make_accelerator("cpu"), img_size=32)


@pytest.mark.parametrize("flags,line", [
    (["--shuffle-grids", "1,2,5"], "--shuffle-grids: grid 5 does not divide the image size 32: use divisors of 32 "
                                   "(1, 2, 4, 8, 16, 32)"),
    (["--shuffle-grids", "3,4,6"], "--shuffle-grids: grids 3, 6 do not divide the image size 32: use divisors of 32 "
                                   "(1, 2, 4, 8, 16, 32)"),
    (["--occlusion-grid", "5"], "--occlusion-grid 5 does not divide the image size 32: use a divisor of 32 "
                                "(1, 2, 4, 8, 16, 32)"),
    (["--occlusion-grid", "0"], "--occlusion-grid must be >= 1 (cells per side), got 0"),
    (["--occlusion-grid", "-2"], "--occlusion-grid must be >= 1 (cells per side), got -2")])
def test_robustness_options_this_model_cannot_take_are_one_line_before_any_work(flags, line, tmp_path, data_cache,
                                                                                capsys, monkeypatch):
    """A shuffle grid that does not divide the image size failed only at the patch-shuffle curve, after the CNN
    baseline had trained and the ViT's occlusion curve had run; --occlusion-grid 0 became the ViT's grid without a
    word and -2 was a traceback. Now each is refused before the images load or the baseline trains."""
    rc, err = _refused_before_any_work("robustness", flags, tmp_path, data_cache, capsys, monkeypatch)
    assert (rc, err) == (2, f"vitscale: error: {line}\n")


def test_eval_all_checks_the_robustness_grids_before_the_probes(tmp_path, data_cache, capsys, monkeypatch):
    """`eval all` runs accuracy and the probes first: a grid the model cannot take was found after them."""
    rc, err = _refused_before_any_work("all", ["--shuffle-grids", "5"], tmp_path, data_cache, capsys, monkeypatch)
    assert rc == 2 and "--shuffle-grids: grid 5 does not divide the image size 32" in err, err


def _refused_before_any_work(evaluations, flags, tmp_path, data_cache, capsys, monkeypatch):
    """(exit code, stderr) of `vitscale eval EVALUATIONS` on a timm file, where any evaluation that starts fails."""
    import vitscale.eval.robust_run as robust_run
    import vitscale.eval.run as eval_run

    def started(*a, **k):
        raise AssertionError("an evaluation started")

    monkeypatch.setenv("VITSCALE_DEBUG", "")
    for module, name in ((robust_run, "_eval_images"), (robust_run, "_models"), (eval_run, "_accuracy"),
                         (eval_run, "_probes")):
        monkeypatch.setattr(module, name, started)
    torch.save(_timm().state_dict(), tmp_path / "vit.pth")
    rc, cap = _main(["eval", evaluations, str(tmp_path / "vit.pth"), *DATA, "--cache-dir", str(data_cache),
                     "--out", str(tmp_path / "out"), *flags], capsys)
    return rc, cap.err


def test_model_dependent_robustness_checks_only_the_curves_requested():
    """A 36 px model cannot be shuffled on the default 8 x 8 grid, but its corruption curve alone needs no grid."""
    from vitscale.eval.robustness import RobustnessConfig, check_image_size

    check_image_size(RobustnessConfig(curves=["corruptions"]), 36, 5)
    check_image_size(RobustnessConfig(shuffle_grids=(1, 2, 3, 6)), 36, 9)
    with pytest.raises(ValueError, match="grid 8 does not divide the image size 36"):
        check_image_size(RobustnessConfig(curves=["patch_shuffle"]), 36, 5)
    with pytest.raises(ValueError, match="--occlusion-grid 5 does not divide the image size 36"):
        check_image_size(RobustnessConfig(curves=["occlusion_patches"]), 36, 5)
