"""Model EMA (train.ema_decay): timm's decay schedule, bad keys, and the EMA of ZeRO-2 and ZeRO-3 runs on 2 processes
against a reference computed from a ZeRO-0 run's saved per-step weights; exact across kill -9 and resume, carried
through a resume on another world size (universal conversion), exported with `vitscale export --ema`."""
import os

import pytest
import torch

from conftest import deepspeed_cli, run_cli, train_args
from vitscale.config.load import load_config
from vitscale.errors import ConfigError
from vitscale.distributed.ema import consolidated_ema, ema_decay_at

EMA = ["train.ema_decay=0.6", "train.ema_warmup=true", "train.precision=fp32", "data.global_batch_size=32"]


def test_decay_schedule_is_timms_model_ema_v3():
    from timm.utils.model_ema import ModelEmaV3

    for warmup in (False, True):
        theirs = ModelEmaV3(torch.nn.Linear(2, 2), decay=0.999, use_warmup=warmup)
        for step in range(1, 200):
            assert ema_decay_at(0.999, step, warmup) == pytest.approx(theirs.get_decay(step), abs=1e-15), step


@pytest.mark.parametrize("overrides, words", [
    (["train.ema_decay=1.0"], ["train.ema_decay", "(0, 1)"]),
    (["train.ema_decay=-0.1"], ["train.ema_decay", "(0, 1)"]),
    (["train.ema_decay=0.99", "train.ema_every=0"], ["train.ema_every", ">= 1"]),
    (["train.best_metric=val_top1_ema"], ["train.best_metric=val_top1_ema", "train.ema_decay"]),
])
def test_bad_ema_keys_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def _reference(weights: list[dict], every: int) -> dict:
    """The EMA by its definition, from whole per-step weights: weights[0] = initial, weights[t] = after step t."""
    ema = {k: v.clone().double() for k, v in weights[0].items()}
    for step in range(1, len(weights)):
        if step % every:
            continue
        d = 0.0 if step == 1 else min(0.6, 1 - step ** (-2 / 3))  # timm warmup: 1 - (1 + (t - 1))^(-2/3)
        ema = {k: d * ema[k] + (1 - d) * weights[step][k].double() for k in ema}
    return ema


def _per_step(ckpts, trained: set) -> list[dict]:
    from vitscale.distributed.engine import consolidated_state_dict

    return [{k: v.view(-1) for k, v in consolidated_state_dict(ckpts / f"step_{s:08d}").items() if k in trained}
            for s in range(1, 5)]


@pytest.mark.slow
def test_ema_of_zero2_and_zero3_equals_a_reference_from_zero0_weights(tmp_path, data_cache):
    from vitscale.distributed.engine import consolidated_state_dict

    port = 29500 + os.getpid() % 400
    steps = ["train.steps=4", "train.ckpt_every=1", "train.keep_last=0", "train.eval_every=0", "data.val_shards="]
    runs = {}
    for i, (stage, every) in enumerate(((0, 1), (2, 1), (3, 2))):
        name = f"z{stage}"
        r = deepspeed_cli(2, port + i, train_args(tmp_path, name, data_cache, f"engine.zero_stage={stage}",
                                                  f"train.ema_every={every}", *EMA, *steps), cwd=tmp_path)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        runs[stage] = (tmp_path / name / "checkpoints", every)
    z0 = runs[0][0]
    trained = set(consolidated_ema(z0 / "step_00000001"))
    # the weights the runs start from (every stage builds the same ones from run.seed), which the EMA of the run
    # updated every 2 steps still remembers
    from conftest import DEMO, TINY
    from vitscale.objectives import build_model

    cfg = load_config(DEMO, TINY)
    torch.manual_seed(cfg.run.seed)
    initial = {k: v.detach().view(-1) for k, v in build_model(cfg, 10).named_parameters() if k in trained}
    w0 = [initial] + _per_step(z0, trained)
    for stage, (ckpts, every) in runs.items():
        ema = consolidated_ema(ckpts / "step_00000004")
        assert set(ema) == trained
        own = [initial] + _per_step(ckpts, trained)
        ref_own, ref_z0 = _reference(own, every), _reference(w0, every)
        for k in trained:
            got = ema[k].double()
            # against this run's own saved weights: four fp32 lerps of values below 1, rounding only (~1e-7)
            assert (got - ref_own[k]).abs().max() <= 1e-6, (stage, k)
            # against ZeRO-0's weights: the stages reduce gradients in other orders and AdamW turns that into
            # weights ~1e-5 apart (measured 4.6e-5 after 4 steps); an EMA is a convex combination of the weights,
            # so it may differ by at most the largest per-step weight difference, element by element
            drift = torch.stack([(a[k] - b[k]).abs() for a, b in zip(own[1:], w0[1:])]).amax(dim=0).double()
            assert bool(((got - ref_z0[k]).abs() <= drift + 1e-6).all()), (stage, k)
            assert float(drift.max()) < 1e-3  # the runs did train the same model on the same data
    assert not torch.allclose(consolidated_ema(runs[3][0] / "step_00000004")["head.weight"],
                              consolidated_ema(runs[2][0] / "step_00000004")["head.weight"], atol=1e-4)

    # ZeRO-2's step-2 checkpoint resumed on 1 process (universal conversion): the saved EMA is carried on
    z2 = runs[2][0]
    for s in (3, 4):
        os.rename(z2 / f"step_{s:08d}", tmp_path / f"z2_step_{s}")
    (z2 / "latest").write_text("step_00000002\n")
    one = run_cli(train_args(tmp_path, "z2", data_cache, "engine.zero_stage=2", *EMA, *steps[:-1], "train.steps=3",
                             "data.val_shards="), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "universal layout" in one.stdout and "EMA resumed" in one.stdout
    w3 = consolidated_state_dict(z2 / "step_00000003")
    d = min(0.6, 1 - 3 ** (-2 / 3))
    before, after = consolidated_ema(z2 / "step_00000002"), consolidated_ema(z2 / "step_00000003")
    for k in before:  # one fp32 lerp from the saved EMA of the 2-process run: rounding only
        expected = d * before[k].double() + (1 - d) * w3[k].double().view(-1)
        assert (after[k].double() - expected).abs().max() <= 1e-6, k


def test_ema_is_exact_across_kill_and_resume_and_exports(tmp_path, data_cache):
    """ZeRO-3 on one process: a run killed (SIGKILL) after step 5 resumes from step 4 and ends with the EMA of the
    uninterrupted run, bit for bit; `export --ema` writes it (and the plain export the trained weights)."""
    from safetensors.torch import load_file

    steps = ["engine.zero_stage=3", "train.steps=6", "train.ckpt_every=2", "data.val_shards=", *EMA]
    straight = run_cli(train_args(tmp_path, "straight", data_cache, *steps), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = run_cli(train_args(tmp_path, "resumed", data_cache, *steps), cwd=tmp_path,
                      env_extra={"VITSCALE_FAULT": "kill@after_step,step=5"})
    assert crashed.returncode != 0
    resumed = run_cli(train_args(tmp_path, "resumed", data_cache, *steps), cwd=tmp_path)
    assert resumed.returncode == 0 and "EMA resumed" in resumed.stdout, resumed.stderr[-3000:]
    a = consolidated_ema(tmp_path / "straight" / "checkpoints" / "step_00000006")
    b = consolidated_ema(tmp_path / "resumed" / "checkpoints" / "step_00000006")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    for flag, name in (("--ema", "ema.safetensors"), (None, "plain.safetensors")):
        r = run_cli(["export", str(tmp_path / "straight"), str(tmp_path / name), *([flag] if flag else [])],
                    cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(["export", str(tmp_path / "straight"), str(tmp_path / "timm"), "--timm", "--ema"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ema, plain = load_file(str(tmp_path / "ema.safetensors")), load_file(str(tmp_path / "plain.safetensors"))
    timm_ema = load_file(str(tmp_path / "timm" / "model.safetensors"))  # the folder timm loads (local-dir:)
    assert set(timm_ema) == set(ema) and all(torch.equal(timm_ema[k], ema[k]) for k in ema)
    assert set(ema) == set(plain) and torch.equal(ema["head.weight"].view(-1), a["head.weight"])
    assert not torch.equal(ema["head.weight"], plain["head.weight"])  # the EMA lags the weights


def test_plan_counts_the_ema_with_each_ranks_master_part():
    from conftest import DEMO
    from vitscale.bench.plan import plan_memory

    args = ["model.name=vit_base_patch16", "model.img_size=224", "data.num_classes=1000", "train.precision=bf16"]
    off = plan_memory(load_config(DEMO, args), gpus=4, nodes=2)
    on = plan_memory(load_config(DEMO, args + ["train.ema_decay=0.9999"]), gpus=4, nodes=2)
    T = off.row(0).optimizer // 12  # every parameter trains: 12 bytes/param of fp32 master + moments at ZeRO-0
    for stage, per_rank in ((0, 4 * T), (1, 4 * T // 8), (2, 4 * T // 8), (3, 4 * T // 8)):
        assert on.row(stage).optimizer - off.row(stage).optimizer in (per_rank, per_rank + 1), stage
    assert on.row(2, True).cpu_per_node - off.row(2, True).cpu_per_node == pytest.approx(4 * 4 * T / 8, abs=4)


@pytest.mark.slow
def test_validation_reports_the_ema_picks_best_by_it_and_restores_the_weights(tmp_path, data_cache):
    """ZeRO-3 on 2 processes with periodic validation: each evaluation reports val_top1_ema beside val_top1,
    checkpoints/best follows val_top1_ema (train.best_metric), and the EMA swapped in for its evaluation is swapped
    out again: the run's final evaluation of the weights equals the last periodic val_top1."""
    import json

    from vitscale.logging.metrics import read_metrics

    r = deepspeed_cli(2, 29100 + os.getpid() % 400, train_args(
        tmp_path, "v", data_cache, "engine.zero_stage=3", "train.steps=4", "train.eval_every=2", "train.ckpt_every=4",
        "train.keep_last=0", "train.best_metric=val_top1_ema", *EMA), cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    records = read_metrics(tmp_path / "v" / "metrics.jsonl")
    periodic = [x for x in records if "val_top1_ema" in x]
    assert [x["step"] for x in periodic] == [2, 4]
    assert all(0 <= x["val_top1_ema"] <= 1 and x["val_images"] > 0 for x in periodic)
    best = json.loads((tmp_path / "v" / "checkpoints" / "best.json").read_text())
    assert best["val_top1_ema"] == max(x["val_top1_ema"] for x in periodic)
    final = [x for x in records if "val_top1" in x][-1]
    # the same images through the same (restored) weights: the same count of correct answers
    assert final["val_top1"] == pytest.approx(periodic[-1]["val_top1"], abs=0.5 / final["val_images"])
