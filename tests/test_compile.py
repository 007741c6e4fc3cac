"""train.compile (regional compilation of each transformer block, CPU inductor): the same losses as eager through
the DeepSpeed engine at ZeRO 0-3, with full and selective gradient checkpointing; exact kill -9 resume; checkpoints
keep timm's parameter names; a compiler that fails costs one warning and the blocks run eagerly."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_curves_close, run_cli, train_args
from vitscale.distributed import compile as regional
from vitscale.logging.metrics import read_metrics
from vitscale.models import create_model

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="inductor on CPU needs a C compiler")


def _tiny_vit(depth=2):
    torch.manual_seed(0)
    return create_model("vit_micro_patch8", img_size=32, embed_dim=32, depth=depth, num_heads=2, num_classes=10)


@pytest.mark.slow
def test_compiled_engine_losses_equal_eager_at_every_zero_stage(tmp_path):
    out = tmp_path / "parity.json"
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "compile_parity.py"), str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torch.compile failed" not in r.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"vit_zero0", "vit_zero1", "vit_zero2", "vit_zero3", "vit_zero3_ckpt", "mae_zero2_ckpt1"}
    for name, case in res.items():
        eager, compiled = case["eager"], case["compiled"]
        assert len(eager) == len(compiled) == 20
        assert case["compiled_at_end"] and case["keys_equal"], name  # really compiled; names unchanged
        assert compiled == pytest.approx(eager, abs=1e-5, rel=0), name  # measured: <= 2.4e-7
        assert eager[-1] < 0.8 * eager[0], name  # it trains
    # ZeRO-3 gathering whole blocks computes what plain data parallelism computes, up to summation order
    assert_curves_close(res["vit_zero3"]["eager"], res["vit_zero0"]["eager"], what="ZeRO-3 vs ZeRO-0")


def test_compile_in_place_keeps_names_and_matches_eager():
    model, reference = _tiny_vit(), _tiny_vit()
    keys = list(model.state_dict())
    assert regional.compile_blocks(model, torch.device("cpu")) and regional.is_compiled(model)
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_invalid_backend_warns_once_and_stays_eager(monkeypatch):
    monkeypatch.setattr(regional, "BACKEND", "no_such_backend")
    warnings = []
    model, reference = _tiny_vit(), _tiny_vit()
    assert regional.compile_blocks(model, torch.device("cpu"), warn=warnings.append) is False
    assert len(warnings) == 1 and "no_such_backend" in warnings[0] and "eagerly" in warnings[0]
    assert not regional.is_compiled(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), reference(x))  # eager: bit for bit the uncompiled model


def test_backend_failing_at_first_run_falls_back_once(monkeypatch):
    """A compiler that passes the probe but fails on the real block (code generation for its graph): one warning
    at the first forward, that forward and every later one eager, training unaffected."""
    def flaky(gm, example_inputs):
        if len(list(gm.graph.nodes)) > 12:  # the probe's graph is tiny; a transformer block's is not
            raise RuntimeError("code generation failed for this graph")
        return gm.forward

    monkeypatch.setattr(regional, "BACKEND", flaky)
    warnings = []
    model, reference = _tiny_vit(), _tiny_vit()
    assert regional.compile_blocks(model, torch.device("cpu"), warn=warnings.append)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        out = model(x)
        out.sum().backward()
        assert torch.equal(out, reference(x))
    assert len(warnings) == 1 and "code generation failed" in warnings[0]
    assert not regional.is_compiled(model)


@pytest.mark.slow
def test_compiled_kill_and_resume_is_exact_and_exports_to_timm(tmp_path, data_cache):
    """The trainer with train.compile=true, killed like kill -9 after step 5 and resumed from its step-4
    checkpoint, computes step 5 again bit for bit; its checkpoint exports into timm's ViT with strict names."""
    steps = ["train.steps=6", "train.ckpt_every=4", "train.precision=fp32", "train.compile=true",
             "data.val_shards="]
    crashed = run_cli(train_args(tmp_path, "r", data_cache, *steps), cwd=tmp_path,
                      env_extra={"VITSCALE_FAULT": "kill@after_step,step=5"})
    assert crashed.returncode != 0 and "torch.compile failed" not in crashed.stderr
    resumed = run_cli(train_args(tmp_path, "r", data_cache, *steps), cwd=tmp_path)
    assert resumed.returncode == 0 and "at step 4" in resumed.stdout, resumed.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5, 6]
    assert records[4]["loss"] == records[5]["loss"]  # step 5 before the kill == step 5 after the resume
    assert records[4]["grad_norm"] == records[5]["grad_norm"]

    out = tmp_path / "model.safetensors"
    r = run_cli(["export", str(tmp_path / "r"), str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import timm.models.vision_transformer as timm_vit
    from safetensors.torch import load_file

    sd = load_file(str(out))
    assert not any("_orig_mod" in k for k in sd)
    net = timm_vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                                     num_classes=sd["head.weight"].shape[0])
    net.load_state_dict(sd, strict=True)
