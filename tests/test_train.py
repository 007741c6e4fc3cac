"""End-to-end training through the CLI and DeepSpeed: learning, checkpoints, exact resume, 2 processes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEMO, ROOT, assert_curves_close, copy_run, deepspeed_cli, run_cli, step_losses, train_args
from vitscale.logging.metrics import read_metrics


def _losses(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_kill_and_resume_continues_exactly(tmp_path, data_cache):
    steps = ["train.steps=8", "train.ckpt_every=4"]
    straight = run_cli(train_args(tmp_path, "straight", data_cache, *steps), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    crashed = run_cli(train_args(tmp_path, "resumed", data_cache, *steps), cwd=tmp_path,
                      env_extra={"VITSCALE_FAULT": "kill@after_step,step=5"})
    assert crashed.returncode != 0  # killed like kill -9 after step 5 (its last checkpoint is step 4)
    ckpts = tmp_path / "resumed" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"

    resumed = run_cli(train_args(tmp_path, "resumed", data_cache, *steps), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout

    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    # Steps 1-5 from the first launch, then 5-8 again from the resume at 4: the counter continues at 5.
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    for step in range(5, 9):  # bitwise equal on CPU fp32: same data, same RNG, same weights and optimizer
        assert b[step]["loss"] == a[step]["loss"], (step, a[step]["loss"], b[step]["loss"])
        assert b[step]["lr"] == a[step]["lr"]
    assert a[8]["lr"] < a[4]["lr"]  # cosine decay, no second warmup after resume
    for r in (r for r in records if "loss" in r):  # the objective's metric, synced on log steps: one 16-image batch
        assert 0 <= r["train/acc"] <= 1 and (r["train/acc"] * 16).is_integer(), r
    assert b[8]["train/acc"] == a[8]["train/acc"]

    again = run_cli(train_args(tmp_path, "resumed", data_cache, *steps), cwd=tmp_path)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_truncated_newest_checkpoint_falls_back(tmp_path, data_cache, trained_run):
    copy_run(trained_run, tmp_path, "r")  # checkpoints at steps 2 and 4
    newest = tmp_path / "r" / "checkpoints" / "step_00000004"
    shard = next(newest.glob("*model_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated copy
    r = run_cli(train_args(tmp_path, "r", data_cache, "train.steps=6", "train.ckpt_every=2"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "truncated" in r.stderr and "resumed from" in r.stdout and "step_00000002" in r.stdout


def test_demo_config_learns_digits(tmp_path, data_cache):
    """The README's demo command as written (plus an isolated run dir): held-out accuracy far above chance."""
    r = run_cli(["train", "--config", DEMO, f"run.dir={tmp_path}", f"data.cache_dir={data_cache}",
                 "train.progress=false"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out accuracy" in r.stdout
    records = read_metrics(tmp_path / "demo" / "metrics.jsonl")
    losses = [x["loss"] for x in records if "loss" in x]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3  # loss falls
    val = [x for x in records if "val_top1" in x][-1]
    assert val["val_images"] == 297
    assert val["val_top1"] >= 0.85, val  # chance is 0.10
    cfg = (tmp_path / "demo" / "config.yaml").read_text()
    assert "vit_micro_patch4" in cfg  # the resolved config is saved


def test_device_decode_trains_exactly_like_worker_decode(tmp_path, data_cache):
    """data.decode_on=device (JPEGs decoded by the trainer on its device; nvJPEG on GPUs) is the same training:
    on the CPU the losses are bit for bit those of worker decoding."""
    losses = {}
    for on in ("worker", "device"):
        r = run_cli(train_args(tmp_path, on, data_cache, "data.train_shards=demo:photos", "data.val_shards=",
                               "model.img_size=32", "train.steps=4", f"data.decode_on={on}"), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[on] = [x["loss"] for x in read_metrics(tmp_path / on / "metrics.jsonl") if "loss" in x]
    assert len(losses["device"]) == 4 and losses["device"] == losses["worker"]


def test_demo_mae_config_reconstructs_photos(tmp_path, data_cache):
    """configs/demo_mae.yaml (shortened): MAE on the bundled photos, loss falling, reconstruction PNG saved. The
    config pretrains on demo:nature, which needs two apt packages; the scikit-image photos need none."""
    mae_demo = str(ROOT / "configs" / "demo_mae.yaml")
    r = run_cli(["train", "--config", mae_demo, f"run.dir={tmp_path}", f"data.cache_dir={data_cache}",
                 "data.train_shards=demo:photos", "data.val_shards=demo:photos:val",
                 "train.progress=false", "train.steps=40", "train.log_every=5", "data.batch_size=32",
                 "optim.warmup_steps=10"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_metrics(tmp_path / "demo_mae" / "metrics.jsonl")
    losses = [x["loss"] for x in records if "loss" in x]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < 0.75 * losses[0], losses  # reconstruction loss falls
    assert {x["train/mask_frac"] for x in records if "loss" in x} == {0.75}  # 48 of 64 patches hidden, exactly
    val = [x for x in records if "val_loss" in x][-1]
    assert val["val_images"] == 200 and val["val_loss"] < losses[0]
    png = tmp_path / "demo_mae" / "images" / "mae_step_00000040.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def _deepspeed_train(tmp_path, data_cache, world, port, *overrides):
    r = deepspeed_cli(world, port, train_args(tmp_path, "ds", data_cache, "engine.zero_stage=3", *overrides),
                      cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    # DeepSpeed's CPU all-reduce segments (66 MB a rank) are unlinked by the ranks themselves: before, every launch
    # on a new port left them in /dev/shm, RAM nothing frees (5.3 GB after a day of tests)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return r


@pytest.mark.slow
def test_deepspeed_two_processes_then_one_then_two_then_timm(tmp_path, data_cache):
    """`deepspeed --num_gpus 2 --module vitscale train ...` (ZeRO-3): 2 CPU processes train and write sharded
    checkpoints; the same run continues on 1 process, then on 2 again (each change of world size converts the
    checkpoint to DeepSpeed's universal layout); the result exports into timm."""
    port = 29000 + os.getpid() % 1000
    _deepspeed_train(tmp_path, data_cache, 2, port, "train.steps=4", "train.ckpt_every=2")
    ckpts = tmp_path / "ds" / "checkpoints"
    ckpt = ckpts / "step_00000004"
    assert (ckpt / "COMPLETE").is_file()
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # ZeRO-3: one parameter/optimizer shard per rank
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["samples"] == 4 * 16 * 2

    one = run_cli(train_args(tmp_path, "ds", data_cache, "engine.zero_stage=3", "train.steps=6",
                             "train.ckpt_every=2"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "universal layout to resume at world size 1" in one.stdout and "at step 4" in one.stdout
    assert (ckpt / "universal" / "COMPLETE").is_file()
    _deepspeed_train(tmp_path, data_cache, 2, port + 1, "train.steps=8", "train.ckpt_every=2")
    state = json.loads((ckpts / "step_00000008" / "trainer_state.json").read_text())
    assert state["samples"] == 4 * 32 + 2 * 16 + 2 * 32 and [h[1] for h in state["history"]] == [2, 1, 2]

    records = [r for r in read_metrics(tmp_path / "ds" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9))  # rank 0 alone writes; the counter continues
    losses = [r["loss"] for r in records]
    assert max(losses[4:]) < losses[0] and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2  # the curve continues

    # export the ZeRO-3 shards -> one safetensors file -> timm's VisionTransformer, strict
    import timm.models.vision_transformer as timm_vit
    from safetensors.torch import load_file

    from vitscale.weights import load_model as load_model_for_analysis

    out = tmp_path / "ds.safetensors"
    r = run_cli(["export", str(tmp_path / "ds"), str(out)], cwd=tmp_path)
    assert r.returncode == 0 and "step 8" in r.stdout, r.stderr[-3000:]
    theirs = timm_vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                                        num_classes=10).eval()
    theirs.load_state_dict(load_file(str(out)), strict=True)
    ours, _ = load_model_for_analysis(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5


def test_bench_step_runs_the_trainers_step_without_touching_signal_handlers(tmp_path, data_cache):
    """bench/plan run the trainer's own step (EngineStep); building it must not install the trainer's
    preemption handlers (SIGTERM/SIGUSR1) in the benchmarking process."""
    script = tmp_path / "step.py"
    script.write_text(f"""
import signal, sys, torch
sys.path.insert(0, {str(ROOT / 'tests')!r})
from conftest import DEMO, TINY
from vitscale.config.load import load_config
from vitscale.bench.engine_step import EngineStep, synthetic_batch
before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1))
cfg = load_config(DEMO, [*TINY, "data.cache_dir={data_cache}", "data.global_batch_size=32", "train.grad_accum=2"])
runner = EngineStep(cfg, 10)
images, labels = synthetic_batch(runner.cfg, 10)
losses = [float(runner.step(images, labels)) for _ in range(3)]
assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
assert runner.trainer.preemption is None and runner.cfg.data.batch_size == 16  # 32 / (1 process x 2 accum)
assert tuple(images.shape) == (16, 3, 32, 32) and losses[2] < losses[0], losses  # it trains on that batch
print("ok", losses)
""")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_a_recipe_in_epochs_trains_the_derived_steps_and_saves_them(tmp_path, data_cache):
    """train.epochs / optim.warmup_epochs on the demo digits (its manifest counts the samples): the derived steps
    are printed, trained and written to config.yaml (which reloads as it ran); the metrics end at that step."""
    from vitscale.config.load import load_config

    r = run_cli(train_args(tmp_path, "ep", data_cache, "train.steps=null", "train.epochs=0.05",
                           "optim.warmup_steps=null", "optim.warmup_epochs=0.02", "train.ckpt_every=1000"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    from vitscale.data.demo import ensure_demo_shards

    n = json.loads(open(ensure_demo_shards("digits", str(data_cache))["train"]).read())["num_samples"]
    steps, warmup = -(-n * 5 // (100 * 16)), -(-n * 2 // (100 * 16))  # ceil(epochs x samples / batch 16)
    assert f"train.steps={steps} (train.epochs=0.05 x {n} samples / global batch 16)" in r.stdout
    saved = load_config(tmp_path / "ep" / "config.yaml")
    assert (saved.train.steps, saved.train.epochs, saved.optim.warmup_steps) == (steps, None, warmup)
    assert "# train.steps=" in (tmp_path / "ep" / "config.yaml").read_text()
    assert [m["step"] for m in read_metrics(tmp_path / "ep" / "metrics.jsonl") if "loss" in m][-1] == steps


def test_a_zero3_resume_under_another_sub_group_size_converts_and_continues_the_curve(tmp_path, data_cache):
    """ZeRO-3 keeps one flat optimizer state per sub-group: a resume under another sub_group_size (same world, same
    stage) died in DeepSpeed's load ('loaded state dict contains a parameter group that doesn't match'). The size
    a checkpoint was written under is recorded; another one goes through the universal layout, and the losses are
    the uninterrupted run's."""
    z3 = ("engine.zero_stage=3", "train.steps=4", "train.ckpt_every=2")
    straight = run_cli(train_args(tmp_path, "straight", data_cache, *z3,
                                  "engine.ds_config.zero_optimization.sub_group_size=20000"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli(train_args(tmp_path, "split", data_cache, *z3, "train.steps=2",
                               "engine.ds_config.zero_optimization.sub_group_size=20000"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["zero3_sub_group_size"] == 20000
    second = run_cli(train_args(tmp_path, "split", data_cache, *z3,
                                "engine.ds_config.zero_optimization.sub_group_size=50000"), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "universal layout to resume at optimizer sub_group_size 20000 -> 50000" in second.stdout
    assert "at step 2" in second.stdout
    want, got = step_losses(tmp_path / "straight"), step_losses(tmp_path / "split")
    assert sorted(got) == [1, 2, 3, 4]
    assert_curves_close([got[k] for k in (1, 2, 3, 4)], [want[k] for k in (1, 2, 3, 4)], what="sub-group resume")


def test_resuming_an_older_checkpoint_branches_without_losing_either_history(tmp_path, data_cache, trained_run):
    """train.resume=PATH names step 2 of a run that has step 4. The new branch's checkpoints used to be pruned
    as the oldest (keep_last keeps the highest steps: step 3 went as soon as it was written, while `latest`
    named it) and a later train.resume=auto went back to the old branch's step 4. Now the later checkpoint is set
    aside (renamed, not deleted), and the new branch is what `latest`, pruning and auto-resume see."""
    run = copy_run(trained_run, tmp_path)
    ckpts = run / "checkpoints"
    r = run_cli(train_args(tmp_path, "tiny", data_cache, "train.steps=5", "train.ckpt_every=3", "train.keep_last=2",
                           f"train.resume={ckpts / 'step_00000002'}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert steps[:2] == ["step_00000003", "step_00000004.replaced-" + steps[1].split("-")[-1]], steps
    assert "starts a new branch of this run" in r.stderr
    assert steps[2:] == ["step_00000005"] and (ckpts / "latest").read_text().strip() == "step_00000005"
    # the old branch's checkpoint is whole: it still loads as a checkpoint of its own
    assert json.loads((ckpts / steps[1] / "trainer_state.json").read_text())["step"] == 4
    again = run_cli(train_args(tmp_path, "tiny", data_cache, "train.steps=6"), cwd=tmp_path)
    assert again.returncode == 0 and "resumed from" in again.stdout + again.stderr
    assert "step_00000005 at step 5" in again.stdout + again.stderr


def test_resuming_a_set_aside_checkpoint_is_what_a_relaunch_after_a_crash_continues(tmp_path, data_cache,
                                                                                      trained_run):
    """train.resume=PATH of a checkpoint the run had set aside (step_4.replaced-T, the other branch): killed before
    its first save, the relaunch (train.resume=auto) went back to step 3 of the branch just left. Now `latest`
    names the resumed checkpoint, and auto continues it."""
    run = copy_run(trained_run, tmp_path)
    ckpts = run / "checkpoints"
    first = run_cli(train_args(tmp_path, "tiny", data_cache, "train.steps=3", "train.ckpt_every=3",
                               f"train.resume={ckpts / 'step_00000002'}"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    aside = next(p for p in ckpts.iterdir() if p.name.startswith("step_00000004.replaced-"))
    crashed = run_cli(train_args(tmp_path, "tiny", data_cache, "train.steps=6", "train.ckpt_every=10",
                                 f"train.resume={aside}"), cwd=tmp_path,
                      env_extra={"VITSCALE_FAULT": "kill@mid_step,step=5"})
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert (ckpts / "latest").read_text().strip() == aside.name
    again = run_cli(train_args(tmp_path, "tiny", data_cache, "train.steps=6", "train.ckpt_every=10"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {aside} at step 4" in again.stdout, again.stdout[-2000:]
    assert (ckpts / "step_00000003").is_dir()  # the branch left stays whole


def test_resume_never_in_a_folder_with_checkpoints_starts_over_without_losing_either_run(tmp_path, data_cache,
                                                                                          trained_run):
    """train.resume=never (what the other-model refusal suggests) in a folder with steps 2 and 4: keep_last counted
    them as newer and deleted the new run's step 3 as soon as it was written, `latest` named it anyway, and the next
    launch resumed the old run's step 4. Now the old checkpoints and best record are set aside (renamed)."""
    run = copy_run(trained_run, tmp_path)
    ckpts = run / "checkpoints"
    (ckpts / "best.json").write_text(json.dumps({"tag": "step_00000004", "val_top1": 0.99}))
    r = run_cli(train_args(tmp_path, "tiny", data_cache, "train.steps=3", "train.ckpt_every=3", "train.keep_last=2",
                           "train.resume=never"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starts this run over: its 2 earlier checkpoint(s) were moved aside" in r.stderr
    names = sorted(p.name for p in ckpts.iterdir())
    assert "step_00000003" in names and (ckpts / "latest").read_text().strip() == "step_00000003", names
    assert sum(n.startswith(("step_00000002.replaced-", "step_00000004.replaced-")) for n in names) == 2, names
    assert not (ckpts / "best.json").exists() and any(n.startswith("best.json.replaced-") for n in names)
    # the old run's metrics are set aside too: a plot of this run shows this run's steps only
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert any(p.name.startswith("metrics.jsonl.replaced-") for p in run.iterdir())
    again = run_cli(train_args(tmp_path, "tiny", data_cache, "train.steps=4"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step_00000003 at step 3" in again.stdout + again.stderr  # the new run continues, not the old one


def test_a_launch_killed_during_its_final_evaluation_is_finished_by_the_next(tmp_path, data_cache):
    """Killed (as by a time limit or the OOM killer) after its last checkpoint, during the held-out evaluation:
    the relaunch used to say 'already complete' and metrics.jsonl never got the final val_top1."""
    args = train_args(tmp_path, "f", data_cache, "train.steps=3", "train.eval_every=0")
    r = run_cli(args, cwd=tmp_path, env_extra={"VITSCALE_FAULT": "kill@final_eval"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert not any("val_top1" in m for m in read_metrics(tmp_path / "f" / "metrics.jsonl", strict=False))
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "before its held-out evaluation" in again.stdout and "held-out accuracy" in again.stdout
    final = [m for m in read_metrics(tmp_path / "f" / "metrics.jsonl") if "val_top1" in m]
    assert [m["step"] for m in final] == [3] and final[0]["val_images"] > 0
    third = run_cli(args, cwd=tmp_path)  # now it is complete: nothing runs, nothing is added
    assert third.returncode == 0 and "already complete" in third.stdout
    assert len([m for m in read_metrics(tmp_path / "f" / "metrics.jsonl") if "val_top1" in m]) == 1


def test_a_resume_with_other_optimizer_settings_applies_them(tmp_path, data_cache, trained_run):
    """optim.weight_decay and optim.betas changed on resume: DeepSpeed's load put the checkpoint's values back into
    the param groups, so the new ones were silently ignored (steps 3-4 equal to the old run's to the bit) while
    config.yaml recorded them. Now they apply from the first step after the checkpoint, and the log says so."""
    run = copy_run(trained_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    r = run_cli(train_args(tmp_path, "tiny", data_cache, "train.steps=4", "train.ckpt_every=2", "train.keep_last=0",
                           "optim.weight_decay=5.0", "optim.betas=[0.5,0.6]"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming with other optimizer settings than the checkpoint's (optim.weight_decay=0.05 there, 5.0 here; " \
           "optim.betas=[0.9, 0.999] there, [0.5, 0.6] here): this config's apply from step 3" in r.stderr, r.stderr
    before, after = _losses(trained_run), _losses(run)
    assert after[3]["loss"] == before[3]["loss"]  # the step from the loaded weights: the change is not yet applied
    assert abs(after[4]["loss"] - before[4]["loss"]) > 1e-5, (after[4]["loss"], before[4]["loss"])


def test_a_run_forked_from_another_runs_checkpoint_gets_its_own_wandb_run(tmp_path, data_cache):
    """run.name=b with train.resume=PATH in run a's checkpoints: b logged into a's wandb run (its id came with the
    checkpoint), so online their steps, names and configs merged. A resume within the run keeps its id
    (tests/faults/test_preemption.py)."""
    from conftest import wandb_history

    offline = {"WANDB_MODE": "offline"}
    a = run_cli(train_args(tmp_path, "a", data_cache, "train.steps=2", "train.ckpt_every=2"), cwd=tmp_path,
                env_extra=offline)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_cli(train_args(tmp_path, "b", data_cache, "train.steps=3",
                           f"train.resume={tmp_path / 'a' / 'checkpoints' / 'step_00000002'}"), cwd=tmp_path,
                env_extra=offline)
    assert b.returncode == 0, b.stderr[-3000:]
    (id_a,), (id_b,) = ({run_id for run_id, _, _ in wandb_history(tmp_path / name)} for name in ("a", "b"))
    assert id_a != id_b
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert saved["tracker_id"] == id_b


def test_evaluation_and_checkpoint_time_is_not_the_next_steps_time(tmp_path, data_cache):
    """The metrics line after a periodic evaluation counted the evaluation as training: its step_time, samples_per_s
    and mfu were off by the evaluation's length (minutes at real size: one absurd point on every curve). Here the
    evaluation is made to take 2 s more; the next step's time stays a step's."""
    script = tmp_path / "slow_eval.py"
    script.write_text(
        "import sys, time\n"
        "from vitscale.train import validation\n"
        "real = validation.PeriodicValidation.run\n"
        "def slow(self, *a, **k):\n"
        "    time.sleep(2.0)\n"
        "    return real(self, *a, **k)\n"
        "validation.PeriodicValidation.run = slow\n"
        "from vitscale.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    args = train_args(tmp_path, "ev", data_cache, "train.steps=4", "train.eval_every=2", "train.ckpt_every=100")
    r = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "WANDB_MODE": "disabled"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = _losses(tmp_path / "ev")
    records = read_metrics(tmp_path / "ev" / "metrics.jsonl")
    assert any(m.get("step") == 2 and "val_top1" in m for m in records)  # the evaluation ran after step 2
    assert lines[3]["step_time"] < 1.5, lines[3]  # was the step plus the 2 s evaluation
