"""One loader for every weights source (vitscale runs/exports, timm state dicts, the MAE release) and `model.init`:
fitting a source to a model, the position-table resampling against timm's own, and the report / one-line errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from vitscale.models import create_model
from vitscale.weights import WeightsError, load_model, read_weights
from vitscale.weights.fit import fit_state_dict
from vitscale.weights.init import copy_state, plan_init

DIMS = dict(embed_dim=64, depth=2, num_heads=2)
MODEL_ARGS = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2"]


def _timm_vit(num_classes=7, img_size=32, **kw):
    import timm

    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=4,
                             num_classes=num_classes, **DIMS, **kw).eval()


def _mae_release(path, img_size=32):
    """Our MAE saved the way the MAE release does: {"model": ...}, encoder keys unprefixed, decoder_* and
    mask_token beside them."""
    torch.manual_seed(2)
    mae = create_model("mae_vit_micro_patch4", img_size=img_size, **DIMS)
    sd = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in mae.state_dict().items()}
    assert "cls_token" in sd and "decoder_embed.weight" in sd and "mask_token" in sd
    torch.save({"model": sd}, path)
    return mae


def _target(**kw):
    args = dict(img_size=32, num_classes=10, **DIMS)
    args.update(kw)
    torch.manual_seed(3)
    return create_model("vit_micro_patch4", **args).eval()


def _fake_run(root, model, step=3, **model_cfg):
    """A ZeRO-0 run directory as the trainer writes it (model states, trainer_state.json, COMPLETE, latest)."""
    ck = root / "checkpoints" / f"step_{step:08d}"
    ck.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, ck / "mp_rank_00_model_states.pt")
    cfg = {"model": {"name": "vit_micro_patch4", "img_size": 32, "patch_size": None, "global_pool": "token", **DIMS,
                     **model_cfg}, "objective": {"name": "supervised", "norm_pix_loss": True}}
    (ck / "trainer_state.json").write_text(json.dumps({"step": step, "config": cfg}))
    files = {p.name: p.stat().st_size for p in ck.iterdir()}
    (ck / "COMPLETE").write_text(json.dumps({"step": step, "files": files}))
    (ck.parent / "latest").write_text(ck.name + "\n")
    return root


@pytest.mark.parametrize("grid", [(24, 24), (4, 4), (10, 6)])
def test_pos_embed_resampling_equals_timm(grid):
    from timm.layers import resample_abs_pos_embed

    from vitscale.models.pos_embed import resize_pos_embed

    torch.manual_seed(0)
    table = torch.randn(1, 1 + 14 * 14, 48)
    ours = resize_pos_embed(table, grid, 1, old_grid=(14, 14))
    theirs = resample_abs_pos_embed(table, list(grid), [14, 14], num_prefix_tokens=1)
    assert ours.shape == (1, 1 + grid[0] * grid[1], 48)
    assert (ours - theirs).abs().max() <= 1e-6
    assert torch.equal(ours[:, :1], table[:, :1])  # the class token is kept as it is


def test_timm_state_dict_in_every_wrapper_and_format(tmp_path):
    theirs = _timm_vit(num_classes=10)
    sd = theirs.state_dict()
    files = {"bare.bin": None, "wrapped.pth": {"state_dict": {"module." + k: v for k, v in sd.items()}},
             "model.pth": {"model": sd, "epoch": 3}, "plain.safetensors": None}
    torch.save(sd, tmp_path / "bare.bin")
    torch.save(files["wrapped.pth"], tmp_path / "wrapped.pth")
    torch.save(files["model.pth"], tmp_path / "model.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "plain.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    for name in files:
        model = _target()
        plan = plan_init(str(tmp_path / name), lambda: _target())
        assert plan.report.startswith(f"model.init: {len(sd)} tensors loaded from") and "state dict" in plan.report
        plan.apply(model, log=lambda s: None)
        with torch.no_grad():
            assert (model(x) - theirs(x)).abs().max() <= 1e-5, name  # head included: same class count


def test_timm_weights_at_another_resolution_and_class_count():
    from timm.layers import resample_abs_pos_embed

    theirs = _timm_vit(num_classes=1000)
    model = _target(img_size=48)
    fresh_head = model.head.weight.clone()
    fit = fit_state_dict(model, theirs.state_dict())
    assert fit.notes == ["head re-initialised (10 classes; source had 1000)", "pos_embed resampled 8x8 -> 12x12"]
    copy_state(model, fit.state_dict)
    assert torch.equal(model.head.weight, fresh_head)  # the model's own initialisation stays
    assert torch.equal(model.blocks[1].mlp.fc2.weight, theirs.blocks[1].mlp.fc2.weight)
    expect = resample_abs_pos_embed(theirs.pos_embed.detach(), [12, 12], [8, 8], num_prefix_tokens=1)
    assert (model.pos_embed - expect).abs().max() <= 1e-6


def test_mae_release_format_into_an_avg_pool_classifier(tmp_path):
    mae = _mae_release(tmp_path / "mae_pretrain.pth")
    model = _target(global_pool="avg")
    plan = plan_init(str(tmp_path / "mae_pretrain.pth"), lambda: _target(global_pool="avg"))
    assert "MAE release format" in plan.report
    assert "decoder and mask token dropped (32 tensors)" in plan.report
    assert "head initialised (10 classes; none in the source)" in plan.report
    assert "norm dropped, fc_norm initialised" in plan.report
    plan.apply(model, log=lambda s: None)
    for name, p in mae.encoder.named_parameters():
        if not name.startswith("norm."):
            assert torch.equal(dict(model.named_parameters())[name], p), name
    assert torch.equal(model.fc_norm.weight, torch.ones(64))  # fresh LayerNorm, as MAE fine-tuning starts it
    # the same file as an MAE model for analysis: the loader maps the release's keys too
    # 64 wide under a 128-wide name, no qk-norm: the head count is given (it was guessed as 1; the MAE has 2)
    loaded, info = load_model(tmp_path / "mae_pretrain.pth", model_name="mae_vit_micro_patch4", num_heads=2)
    assert info["objective"] == "mae" and info["part"] == "full"  # adopted as the MAE it is, decoder included
    assert info["num_heads"] == 2
    assert torch.equal(loaded.encoder.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)


def test_vitscale_run_dir_and_export_sources(tmp_path):
    src = _target()
    run = _fake_run(tmp_path / "run", src)
    w = read_weights(run)
    assert w.source == "checkpoint" and w.step == 3 and w.model_cfg["embed_dim"] == 64
    export = tmp_path / "e.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(export),
              metadata={"vitscale_model": json.dumps(w.model_cfg), "vitscale_objective": "supervised",
                        "vitscale_part": "full", "step": "3"})
    x = torch.randn(2, 3, 32, 32)
    for path, kind in ((run, "vitscale checkpoint"), (run / "checkpoints", "vitscale checkpoint"),
                       (export, "vitscale export")):
        model = _target(img_size=32)
        plan = plan_init(str(path), lambda: _target())
        assert kind in plan.report and "step 3" in plan.report
        plan.apply(model, log=lambda s: None)
        with torch.no_grad():
            assert torch.equal(model(x), src(x))


def test_what_does_not_fit_is_one_line_naming_the_keys(tmp_path):
    sd = _timm_vit(num_classes=10).state_dict()
    extra = {**sd, "blocks.0.attn.q_norm.weight": torch.ones(32)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"unexpected blocks\.0\.attn\.q_norm\.weight") as e:
        plan_init(str(tmp_path / "extra.pth"), lambda: _target())
    assert "\n" not in str(e.value)
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.1.")}, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match=r"missing blocks\.1\.attn\.proj\.bias.*\(\+\d+ more\)"):
        plan_init(str(tmp_path / "short.pth"), lambda: _target())
    torch.save({**sd, "blocks.0.mlp.fc1.weight": torch.zeros(128, 32)}, tmp_path / "wide.pth")
    with pytest.raises(WeightsError, match=r"shape mismatch blocks\.0\.mlp\.fc1\.weight \(128, 32\) vs \(256, 64\)"):
        plan_init(str(tmp_path / "wide.pth"), lambda: _target())
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="not a readable torch file"):
        read_weights(tmp_path / "junk.pth")


def test_timm_export_loads_in_timm_alone(tmp_path):
    """`vitscale export RUN OUT --timm`: timm builds the model from the folder (local-dir:) or from the file with
    pretrained_cfg_overlay, without importing vitscale, and computes what our model computes -- here a linear-probe
    model whose BatchNorm before the head is folded into the head."""
    import subprocess
    import sys

    from vitscale.cli import main

    model = _target(global_pool="avg", head_norm=True)
    model.head_norm.running_mean.uniform_(-1, 1)
    model.head_norm.running_var.uniform_(0.5, 2)
    run = _fake_run(tmp_path / "run", model, global_pool="avg", head_norm=True)
    assert main(["export", str(run), str(tmp_path / "out"), "--timm"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224" and config["num_classes"] == 10
    assert config["global_pool"] == "avg" and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "ours.pt")
    script = f"""
import sys, timm, torch, json
out = {str(tmp_path / "out")!r}
x = torch.load({str(tmp_path / "x.pt")!r})
a = timm.create_model("local-dir:" + out, pretrained=True).eval()
args = json.load(open(out + "/config.json"))["model_args"]
b = timm.create_model("vit_base_patch16_224", pretrained=True,
                      pretrained_cfg_overlay=dict(file=out + "/model.safetensors", num_classes=10), **args).eval()
with torch.no_grad():
    ya, yb = a(x), b(x)
ours = torch.load({str(tmp_path / "ours.pt")!r})
assert "vitscale" not in sys.modules
print((ya - ours).abs().max().item(), (yb - ours).abs().max().item())
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    diffs = [float(v) for v in r.stdout.split()]
    assert max(diffs) <= 1e-5, diffs


def test_registers_and_qk_norm_export_to_timm_and_load_from_timm(tmp_path):
    """`export --timm`'s model_args rebuild the same network in timm; a timm state dict with registers and q/k norms
    (no vitscale metadata) loads with its sizes, registers and norms inferred from the tensors."""
    import timm.models.vision_transformer as timm_vit

    from vitscale.weights.timm_export import timm_model_args

    ours = _target(qk_norm=True, reg_tokens=4)
    with torch.no_grad():
        ours.reg_token.normal_()  # not the near-zero init, so a lost register shows in the outputs
    args = timm_model_args(ours)
    assert args["qk_norm"] is True and args["reg_tokens"] == 4
    theirs = timm_vit.VisionTransformer(**args).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (theirs(x) - ours(x)).abs().max() <= 1e-5  # fp32 rounding through 2 blocks on O(1) logits
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(path))
    model, info = load_model(path, model_name="vit_micro_patch4")
    assert info["num_prefix_tokens"] == 5 and info["model_cfg"]["reg_tokens"] == 4
    with torch.no_grad():
        assert (model(x) - ours(x)).abs().max() <= 1e-5


def test_timm_encoder_into_an_mae_starts_the_decoder_fresh():
    """Continued MAE pretraining from a timm ViT: the encoder loads under `encoder.`, the decoder keeps its own init;
    the timm head has nowhere to go in an MAE and is dropped."""
    theirs = _timm_vit(num_classes=10)
    mae = create_model("mae_vit_micro_patch4", img_size=32, **DIMS)
    decoder_before = mae.decoder_pred.weight.clone()
    fit = fit_state_dict(mae, theirs.state_dict())
    assert fit.notes == ["decoder initialised (not in the source)", "head dropped (the model has none; source had 10 "
                                                                     "classes)"]
    from vitscale.weights.fit import to_model_keys

    copy_state(mae, to_model_keys(mae, fit.state_dict))
    assert torch.equal(mae.encoder.blocks[1].attn.qkv.weight, theirs.blocks[1].attn.qkv.weight)
    assert torch.equal(mae.decoder_pred.weight, decoder_before)


def test_mae_release_into_an_mae_at_another_size_keeps_its_own_sincos_tables(tmp_path):
    """Continued MAE pretraining at 48 px from a 32 px MAE release: both fixed sin-cos tables are the model's own
    exact 12x12 ones (a bicubic resample of the 8x8 table was 1.89 off the exact one), everything else loads."""
    from vitscale.models.pos_embed import sincos_2d

    src = _mae_release(tmp_path / "mae_pretrain.pth")
    plan = plan_init(str(tmp_path / "mae_pretrain.pth"), lambda: create_model("mae_vit_micro_patch4", img_size=48,
                                                                               **DIMS))
    assert plan.report.endswith("(MAE release format); pos_embed and decoder_pos_embed: the model's own sin-cos "
                                "tables for 12x12 (fixed, not resampled)")
    mae = create_model("mae_vit_micro_patch4", img_size=48, **DIMS)
    plan.apply(mae, log=lambda s: None)
    assert torch.equal(mae.encoder.pos_embed, sincos_2d(64, (12, 12), 1)[None])
    assert torch.equal(mae.decoder_pos_embed, sincos_2d(mae.decoder_pos_embed.shape[-1], (12, 12), 1)[None])
    assert torch.equal(mae.encoder.blocks[1].attn.qkv.weight, src.encoder.blocks[1].attn.qkv.weight)
    assert torch.equal(mae.encoder.cls_token, src.encoder.cls_token)


@pytest.mark.parametrize("source, model, cause", [
    (dict(), dict(class_token=False, global_pool="avg"),
     r"the source has a class token and the model none \(model\.class_token=true\); unexpected cls_token"),
    (dict(reg_tokens=4), dict(reg_tokens=2), r"the source has 4 register tokens, the model 2 \(model\.reg_tokens=4\); "
                                             r"shape mismatch reg_token \(1, 4, 64\) vs \(1, 2, 64\)"),
    (dict(embed_dim=128, num_heads=4), dict(), r"the source is 128 wide, the model 64 \(model\.embed_dim\); "
                                               r"shape mismatch cls_token \(1, 1, 128\) vs \(1, 1, 64\)")])
def test_prefix_tokens_or_width_that_differ_are_named_not_hidden_behind_the_position_table(source, model, cause):
    """Each was "pos_embed: 65 patch positions do not form a square grid" (or "another width"): the table's rows
    were resampled before the tokens that explain them were compared."""
    import timm

    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10,
                               **{**DIMS, **source})
    with pytest.raises(WeightsError, match="^model.init=x do not fit the model: " + cause):
        fit_state_dict(_target(**model), theirs.state_dict(), what="model.init=x")


@pytest.mark.parametrize("img_size", [32, 48])
def test_timm_no_embed_class_tables_load_exactly(img_size):
    """timm's no_embed_class layout (DeiT-III, the *_reg4_* models: position rows for the patches only, the prefix
    tokens get none) loads with zero rows for [CLS] and the registers, output for output (and resampled at 48 px)."""
    from timm.layers import resample_abs_pos_embed

    theirs = _timm_vit(num_classes=10, no_embed_class=True, reg_tokens=4)
    with torch.no_grad():
        theirs.reg_token.normal_()
    model = _target(reg_tokens=4, img_size=img_size)
    fit = fit_state_dict(model, theirs.state_dict())
    assert fit.notes[0] == "pos_embed: zero rows added for 5 prefix tokens (timm's no_embed_class layout)"
    copy_state(model, fit.state_dict)
    assert torch.equal(model.pos_embed[:, :5], torch.zeros(1, 5, 64))
    if img_size == 32:
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert (model(x) - theirs(x)).abs().max() <= 1e-5
    else:
        expect = resample_abs_pos_embed(theirs.pos_embed.detach(), [12, 12], [8, 8], num_prefix_tokens=0)
        assert fit.notes[1] == "pos_embed resampled 8x8 -> 12x12"
        assert (model.pos_embed[:, 5:] - expect).abs().max() <= 1e-6


def test_a_folder_holding_model_safetensors_is_read(tmp_path):
    """`export --timm`'s folder (and a Hugging Face download) was "no checkpoint in X": its model.safetensors now
    starts a fine-tune and loads for eval (--model, its head count given), computing what the run's model did."""
    from vitscale.cli import main

    src = _target()
    run = _fake_run(tmp_path / "run", src)
    assert main(["export", str(run), str(tmp_path / "out"), "--timm"]) == 0
    x = torch.randn(2, 3, 32, 32)
    model = _target()
    plan = plan_init(str(tmp_path / "out"), lambda: _target())
    assert plan.report.startswith(f"model.init: {len(src.state_dict())} tensors loaded from {tmp_path / 'out'} "
                                  f"(state dict)")
    plan.apply(model, log=lambda s: None)
    loaded, info = load_model(tmp_path / "out", model_name="vit_micro_patch4", num_heads=2)
    with torch.no_grad():
        assert torch.equal(model(x), src(x)) and torch.equal(loaded(x), src(x))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no checkpoint in"):  # a folder with neither is still refused
        read_weights(tmp_path / "empty")


def test_timm_training_checkpoint_and_lightning_checkpoint(tmp_path):
    """timm train.py's model_best.pth.tar was an "unknown weights format"; a Lightning .ckpt kept its `model.` key
    prefix (so nothing fitted). Both now give the network's own state dict -- the trained one, not the EMA's."""
    theirs = _timm_vit(num_classes=10)
    sd = theirs.state_dict()
    ema = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save({"epoch": 3, "arch": "vit_tiny_patch16_224", "state_dict": sd, "state_dict_ema": ema,
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "model_best.pth.tar")
    torch.save({"epoch": 1, "state_dict": {"model." + k: v for k, v in sd.items()}}, tmp_path / "last.ckpt")
    for name in ("model_best.pth.tar", "last.ckpt"):
        w = read_weights(tmp_path / name)
        assert set(w.state_dict) == set(sd), name
        assert all(torch.equal(w.state_dict[k], v) for k, v in sd.items()), name
    with pytest.raises(WeightsError, match="unknown weights format"):  # another .tar is no torch file
        (tmp_path / "shards.tar").write_bytes(b"x")
        read_weights(tmp_path / "shards.tar")
