"""`vitscale export`: a bf16 run's fp32 master weights at every ZeRO stage, and never over a file it did not write.

DeepSpeed names a bf16 run's optimizer files ``bf16_zero_pp_rank_*``; export looked for ``zero_pp_rank_*`` only, so
at ZeRO 1-2 it wrote the bf16 copies widened to fp32 (every value bf16-representable), and at ZeRO-3, where no
``mp_rank_*`` file holds the module, it failed ("no DeepSpeed model states"). At ZeRO-0 the masters sit in the
model file's optimizer state without names (``vitscale.distributed.fp32_masters``)."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_run, run_cli, train_args
from vitscale.distributed.checkpoint import is_complete
from vitscale.config.load import load_config
from vitscale.objectives import build_model
from vitscale.optim import param_groups


def _bf16_exact(t: torch.Tensor) -> float:
    """The fraction of values a bf16 number holds exactly."""
    return (t.bfloat16().float() == t).float().mean().item()


def _masters_from_the_optimizer_groups(run_dir, ckpt) -> dict:
    """ZeRO-0's fp32 masters named the way the trainer grouped them: the run's model rebuilt from its config,
    grouped by vitscale.optim.param_groups, zipped with the file's fp32_groups (independent of the export's
    matching by rounded value)."""
    cfg = load_config(str(run_dir / "config.yaml"))
    # (a file this test's own run wrote: a full load is safe here)
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    with torch.device("meta"):  # (the demo's classes come from its data: the head's rows)
        model = build_model(cfg, states["module"]["head.weight"].shape[0])
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    out = {}
    for group, masters in zip(groups, states["optimizer"]["fp32_groups"], strict=True):
        for p, m in zip(group["params"], masters, strict=True):
            out[names[id(p)]] = m.float()
    return out


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_bf16_run_exports_its_fp32_masters(tmp_path, data_cache, stage):
    r = run_cli(train_args(tmp_path, "b", data_cache, "train.steps=3", "train.eval_every=0",
                           "train.precision=bf16", f"engine.zero_stage={stage}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "b"
    e = run_cli(["export", str(run), str(tmp_path / "w.safetensors")], cwd=tmp_path)
    assert e.returncode == 0, e.stderr[-2000:]
    sd = load_file(str(tmp_path / "w.safetensors"))
    trained = [k for k in sd if k.startswith("blocks.")]
    # after 3 AdamW steps an fp32 master is bf16-exact by chance only (1 in 2^16 for a value that moved)
    assert all(_bf16_exact(sd[k]) < 0.5 for k in trained), {k: _bf16_exact(sd[k]) for k in trained}
    if stage == 0:
        masters = _masters_from_the_optimizer_groups(run, run / "checkpoints" / "step_00000003")
        for name, m in masters.items():
            assert torch.equal(sd[name], m), name


def test_export_never_replaces_what_it_did_not_write(tmp_path, trained_run):
    """An export onto the run's own checkpoint shard used to replace it (the only checkpoint was lost: 'not a
    complete checkpoint ... truncated?'), and onto its config.yaml the same; a folder gave a SafetensorError
    traceback. Each is now one line, before any work, and the file is untouched; an earlier export is replaced."""
    run = copy_run(trained_run, tmp_path)
    ckpt = run / "checkpoints" / "step_00000004"
    shard = next(ckpt.glob("*model_states.pt"))
    for target in (shard, run / "config.yaml"):
        before = target.read_bytes()
        r = run_cli(["export", str(run), str(target)], cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == (f"vitscale: error: {target} exists and is not a safetensors "
                                                     f"file: not overwriting it (choose another path)")
        assert target.read_bytes() == before
    assert is_complete(ckpt)[0]
    r = run_cli(["export", str(run), str(run)], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"vitscale: error: {run} is a folder")
    r = run_cli(["export", str(run), str(run / "config.yaml"), "--timm"], cwd=tmp_path)
    assert r.returncode == 2 and "exists and is not a folder" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "w.safetensors"
    for _ in range(2):  # the second replaces the first
        r = run_cli(["export", str(run), str(out)], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
    assert load_file(str(out)) and [p.name for p in tmp_path.iterdir() if p.name.startswith(".w.")] == []


def test_the_ema_of_a_bf16_zero0_run_averages_its_fp32_masters(tmp_path, data_cache):
    """At ZeRO-0 in bf16 the EMA averaged the bf16 weights (DeepSpeed's unfused bf16 optimizer keeps the masters
    in lists beside the parameters, not linked to them): with a decay of ~0 the EMA is the latest weights, and it
    was bf16-exact everywhere. Now it is the fp32 masters, as at ZeRO 1-3."""
    r = run_cli(train_args(tmp_path, "e", data_cache, "train.steps=3", "train.eval_every=0", "train.precision=bf16",
                           "engine.zero_stage=0", "train.ema_decay=1e-9"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for flag in ([], ["--ema"]):
        e = run_cli(["export", str(tmp_path / "e"), str(tmp_path / "w.safetensors"), *flag], cwd=tmp_path)
        assert e.returncode == 0, e.stderr[-2000:]
        sd = load_file(str(tmp_path / "w.safetensors"))
        if not flag:
            masters = sd
    for k in (k for k in sd if k.startswith("blocks.")):
        assert _bf16_exact(sd[k]) < 0.5, k
        torch.testing.assert_close(sd[k], masters[k], rtol=1e-6, atol=1e-7)
