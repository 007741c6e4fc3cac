"""Fine-tuning and linear probing as modes of `vitscale train`: model.init from other weights (through the real
CLI, 1 process and 2 under ZeRO-3), frozen encoders, MAE-style heads, periodic validation."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import deepspeed_cli, f32_approx, run_cli, train_args
from vitscale.logging.metrics import read_metrics

DIMS = dict(embed_dim=64, depth=2, num_heads=2)


def _timm_source(path, num_classes=7):
    import timm

    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                              num_classes=num_classes, **DIMS)
    torch.save({"model": model.state_dict()}, path)
    return model


def _mae_release(path):
    from vitscale.models import create_model

    torch.manual_seed(2)
    mae = create_model("mae_vit_micro_patch4", img_size=32, **DIMS)
    torch.save({"model": {k.removeprefix("encoder."): v for k, v in mae.state_dict().items()}}, path)
    return mae


def _export(run_dir, out):
    r = run_cli(["export", str(run_dir), str(out)], cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    return load_file(str(out))


def test_mae_release_init_at_another_resolution_then_resume_ignores_it(tmp_path, data_cache):
    _mae_release(tmp_path / "mae_pretrain.pth")
    args = train_args(tmp_path, "ft", data_cache, f"model.init={tmp_path / 'mae_pretrain.pth'}", "model.img_size=48",
                      "model.global_pool=avg", "model.head_init_std=2e-5", "train.ckpt_every=2", "train.steps=2")
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("model.init:"))
    assert "MAE release format" in line and "pos_embed resampled 8x8 -> 12x12" in line
    assert "decoder and mask token dropped (32 tensors)" in line and "head initialised (10 classes" in line
    assert "norm dropped, fc_norm initialised" in line
    again = run_cli(args[:-1] + ["train.steps=3"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ignored: resuming" in again.stdout and "model.init:" not in again.stdout
    assert "resumed from" in again.stdout


def test_init_that_does_not_fit_is_one_line_and_writes_nothing(tmp_path, data_cache):
    model = _timm_source(tmp_path / "src.pth")
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.mlp")}
    torch.save(sd, tmp_path / "short.pth")
    for source, words in ((tmp_path / "short.pth", "missing blocks.1.mlp.fc1.bias"),
                          (tmp_path / "nothing.pth", "weights not found")):
        r = run_cli(train_args(tmp_path, "bad", data_cache, f"model.init={source}", "train.steps=1"), cwd=tmp_path)
        assert r.returncode == 2 and words in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "bad").exists()  # refused before the run directory exists
    r = run_cli(train_args(tmp_path, "bad", data_cache, "model.freeze=blockz", "train.steps=1"), cwd=tmp_path)
    assert r.returncode == 2 and "model.freeze: 'blockz' names no parameter" in r.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_zero3_two_processes_load_exactly_what_zero0_loads(tmp_path, data_cache):
    """optim.lr=0: after one step the weights are still the initial ones, so the exported runs show the load.
    ZeRO-3 with zero.Init on 2 processes (each holds half of every tensor) must equal a 1-process ZeRO-0 load, bit
    for bit, and equal the source where nothing was changed."""
    from timm.layers import resample_abs_pos_embed

    source = _timm_source(tmp_path / "timm.pth")
    common = [f"model.init={tmp_path / 'timm.pth'}", "model.img_size=48", "model.head_init_std=0.01",
              "optim.lr=0", "train.steps=1", "train.eval_every=1"]
    port = 29500 + os.getpid() % 500
    r = deepspeed_cli(2, port, train_args(tmp_path, "z3", data_cache, "engine.zero_stage=3", *common), cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "head re-initialised (10 classes; source had 7)" in r.stdout
    r = run_cli(train_args(tmp_path, "z0", data_cache, "engine.zero_stage=0", *common), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    z3, z0 = _export(tmp_path / "z3", tmp_path / "z3.safetensors"), _export(tmp_path / "z0",
                                                                             tmp_path / "z0.safetensors")
    assert z3.keys() == z0.keys()
    for k in z0:
        assert torch.equal(z3[k], z0[k]), k
    src = source.state_dict()
    for k in z0:
        if k.startswith("blocks.") or k.startswith("patch_embed") or k in ("cls_token", "norm.weight"):
            assert torch.equal(z0[k], src[k]), k
    expect = resample_abs_pos_embed(src["pos_embed"], [12, 12], [8, 8], num_prefix_tokens=1)
    assert (z0["pos_embed"] - expect).abs().max() <= 1e-6
    assert 0.001 < z0["head.weight"].std() < 0.02 and torch.all(z0["head.weight"].abs() <= 0.02)  # trunc. at 2 std
    # validation split over 2 ranks (each reads half the held-out samples) reports what 1 process does
    v3, v0 = ([r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "val_top1" in r][0]
              for name in ("z3", "z0"))
    assert v3["val_images"] == v0["val_images"] == 297
    assert v3["val_top1"] == v0["val_top1"] and v3["val_top5"] == v0["val_top5"] and v0["val_top5"] > v0["val_top1"]
    # the mean of 297 per-image losses summed in two halves instead of one pass: float32 summation order
    assert v3["val_loss"] == f32_approx(v0["val_loss"], scale=v0["val_loss"], terms=297)


def test_linear_probe_trains_the_head_alone_and_keeps_the_best_checkpoint(tmp_path, data_cache):
    """model.freeze=encoder + model.head_norm + LARS (MAE's linear probe): the encoder leaves the run exactly as it came
    from the MAE release file; the head and its BatchNorm statistics move; validation every 2 steps; the best top-1
    checkpoint survives pruning and checkpoints/best points at it."""
    mae = _mae_release(tmp_path / "mae.pth")
    r = run_cli(train_args(tmp_path, "lp", data_cache, f"model.init={tmp_path / 'mae.pth'}", "model.freeze=encoder",
                           "model.head_norm=true", "model.head_init_std=0.01", "optim.name=lars", "engine.zero_stage=0",
                           "optim.lr=10", "optim.weight_decay=0",
                           "train.steps=6", "train.eval_every=2", "train.ckpt_every=100", "train.keep_last=1"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sd = _export(tmp_path / "lp", tmp_path / "lp.safetensors")
    for name, p in mae.encoder.named_parameters():
        assert torch.equal(sd[name], p.detach()), name
    assert sd["head_norm.running_var"].ne(1).all() and sd["head_norm.num_batches_tracked"] == 6 * 1
    assert "head_norm.weight" not in sd  # BatchNorm without affine parameters
    from vitscale.models import create_model
    from vitscale.train.model_init import init_head

    start = create_model("vit_micro_patch4", img_size=32, num_classes=10, head_norm=True, **DIMS)
    init_head(start, 0.01, seed=0)  # the head the run started from (run.seed 0)
    moved = (sd["head.weight"] - start.head.weight.detach()).abs().max()
    assert 1e-4 < moved < 1.0, moved  # LARS steps of about lr x 0.001 x |w| each
    val = [x for x in read_metrics(tmp_path / "lp" / "metrics.jsonl") if "val_top1" in x]
    assert [x["step"] for x in val] == [2, 4, 6]
    assert all(0.0 <= x["val_top1"] <= x["val_top5"] <= 1.0 for x in val)
    ckpts = tmp_path / "lp" / "checkpoints"
    best = json.loads((ckpts / "best.json").read_text())
    assert best["val_top1"] == max(x["val_top1"] for x in val)
    assert best["step"] == next(x["step"] for x in val if x["val_top1"] == best["val_top1"])
    tag = (ckpts / "best").read_text().strip()
    assert tag == best["tag"] and (ckpts / tag / "COMPLETE").is_file() and (ckpts / "step_00000006").is_dir()


def test_sgd_and_lars_steps_by_hand_with_layer_decay():
    """One step of each optimizer on a tiny ViT's groups (layer decay 0.5), against the update rules written out:
    SGD with momentum; LARS (trust ratio 0.001 |w| / (|g| + wd |w|) for tensors of more than one dimension, plain
    momentum otherwise; with weight decay 0, as in MAE's linear probe, exactly MAE's rule)."""
    from types import SimpleNamespace

    from vitscale.models import create_model
    from vitscale.optim import param_groups
    from vitscale.optim.optimizers import build_optimizer

    for name in ("sgd", "lars"):
        torch.manual_seed(0)
        model = create_model("vit_micro_patch4", img_size=16, num_classes=3, **DIMS)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = SimpleNamespace(optim=SimpleNamespace(name=name, momentum=0.9, weight_decay=0.1))
        groups = param_groups(model, 0.1, layer_decay=0.5)
        opt = build_optimizer(groups, cfg)
        for g in opt.param_groups:
            g["lr"] = 0.3 * g["lr_scale"]
        model(torch.randn(2, 3, 16, 16)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        scale = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
        for n, p in model.named_parameters():
            lr, wd = scale[id(p)]
            d = grads[n] + wd * before[n]
            if name == "lars" and p.ndim > 1:  # the LARS paper's trust ratio (MAE's when weight decay is 0)
                w = before[n].norm()
                d = d * 0.001 * w / (grads[n].norm() + wd * w)
            assert torch.allclose(p.detach(), before[n] - lr * d, atol=1e-7, rtol=1e-5), (name, n)
        assert opt.param_groups[0]["lr"] < opt.param_groups[-1]["lr"]  # layer decay: the stem learns slowest


def test_lars_under_zero_is_a_one_line_config_error(tmp_path, data_cache):
    r = run_cli(train_args(tmp_path, "bad", data_cache, "optim.name=lars", "engine.zero_stage=2"), cwd=tmp_path)
    assert r.returncode == 2 and "optim.name=lars needs whole tensors" in r.stderr
    assert not (tmp_path / "bad").exists()
