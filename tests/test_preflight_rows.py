"""The verdicts of `vitscale preflight`'s rows, on checkpoint directories laid out by hand (the launches themselves
run at real size in tests/test_preflight.py and in docs/benchmarks.md's rehearsals)."""
import contextlib
import json
from pathlib import Path

import pytest

from vitscale.bench.preflight import torn_verdict
from vitscale.distributed.checkpoint import COMPLETE, tag_for


def _checkpoint(ckpts, step, sizes, complete=True):
    path = ckpts / tag_for(step)
    path.mkdir(parents=True)
    for name, size in sizes.items():
        (path / name).write_bytes(b"\0" * size)
    if complete:
        (path / COMPLETE).write_text(json.dumps({"step": step, "files": sizes}))
    return path


def test_a_write_cut_short_leaves_the_previous_checkpoint_the_resume_point(tmp_path):
    previous = _checkpoint(tmp_path, 2, {"mp_rank_00_model_states.pt": 4000, "rank_00000.pt": 100})
    torn = _checkpoint(tmp_path, 3, {"mp_rank_00_model_states.pt": 1000}, complete=False)
    row = torn_verdict(tmp_path, previous, torn, written=1000, prev_bytes=4100)
    assert row.ok, row
    assert "resume point step_00000002" in row.value and "no COMPLETE marker" in row.note


def test_a_torn_write_that_counts_as_complete_fails_the_row(tmp_path):
    # the marker is written last; a marker whose files are all there makes the newer step the resume point
    previous = _checkpoint(tmp_path, 2, {"a.pt": 10})
    torn = _checkpoint(tmp_path, 3, {"a.pt": 10})
    row = torn_verdict(tmp_path, previous, torn, written=10, prev_bytes=10)
    assert not row.ok and "counts as complete" in row.note


def test_a_marker_listing_a_file_cut_short_does_not_count(tmp_path):
    # a copy (or a write) that left a shard shorter than COMPLETE records: never resumed from
    previous = _checkpoint(tmp_path, 2, {"a.pt": 10})
    torn = _checkpoint(tmp_path, 3, {"a.pt": 10})
    (torn / "a.pt").write_bytes(b"\0" * 4)
    row = torn_verdict(tmp_path, previous, torn, written=4, prev_bytes=10)
    assert row.ok and "step_00000002" in row.value, row


def test_a_resume_that_does_not_fit_is_a_one_line_row_not_a_launch(tmp_path, monkeypatch):
    """ViT-H/14 on 1 process at ZeRO-2 plans 20.6 GB: on a machine with less available the row says so in one line
    and nothing is launched (the OOM killer would take the rank, or a neighbour)."""
    from vitscale.bench import preflight
    from vitscale.config.load import load_config

    launched = []
    monkeypatch.setattr(preflight, "available_bytes", lambda: 8 * 2 ** 30)
    monkeypatch.setattr(preflight, "run", lambda *a, **k: launched.append(a))
    config = str(Path(__file__).resolve().parents[1] / "configs" / "mae_vit_h14.yaml")
    args = ["engine.zero_stage=3", "train.precision=fp32", "data.batch_size=1", "data.train_shards=demo:photos"]
    rows = preflight.resume_rows(load_config(config, args), config, args, {}, tmp_path, 29999, "cpu")
    assert launched == [] and len(rows) == 1 and not rows[0].ok
    assert rows[0].what == "resume 1 proc ZeRO-2" and rows[0].value == "not run"
    planned = float(rows[0].note.split(" plans ")[1].split(" GB")[0])
    assert 18 < planned < 23 and rows[0].note.endswith("8.0 GB available here"), rows[0].note


def test_a_fine_tuning_recipe_is_rehearsed_with_a_cut_batch_and_no_placeholder_init():
    """finetune_mae_vit_h14_448.yaml gives data.global_batch_size=1024, warm-up in epochs and a model.init path that
    exists only on the user's cluster: the rehearsal takes the batch a process would get, cut (CPU: 2), warms up over
    one step and starts from random weights, at the recipe's model and resolution."""
    from vitscale.bench.preflight import rehearsal_overrides
    from vitscale.config.load import load_config

    config = str(Path(__file__).resolve().parents[1] / "configs" / "finetune_mae_vit_h14_448.yaml")
    recipe = load_config(config)
    cfg = load_config(config, rehearsal_overrides(recipe, cuda=False))
    assert recipe.data.global_batch_size == 1024 and cfg.data.global_batch_size is None
    assert cfg.data.batch_size == 2 and cfg.model.init == "" and cfg.optim.warmup_steps == 1
    assert cfg.train.steps == 2 and cfg.train.epochs is None and cfg.train.precision == "fp32"
    assert (cfg.model.name, cfg.model.img_size, cfg.engine.zero_stage) == \
        (recipe.model.name, 448, recipe.engine.zero_stage)
    gpu = load_config(config, rehearsal_overrides(recipe, cuda=True))
    assert gpu.data.batch_size == 512 and gpu.train.precision == recipe.train.precision  # fit_batch cuts it on a GPU


def test_rewind_makes_a_checkpoint_the_newest_again_and_refuses_an_incomplete_one(tmp_path):
    """What the rehearsal does after its stage-changing resume row: the recipe's step-2 checkpoint becomes what
    `latest`, a resume ("auto") and an export of the run find; later ones are gone."""
    from vitscale.distributed.checkpoint import CheckpointManager, resolve_checkpoint

    _checkpoint(tmp_path, 2, {"a.pt": 10})
    _checkpoint(tmp_path, 3, {"a.pt": 10})
    _checkpoint(tmp_path, 4, {"a.pt": 10}, complete=False)
    (tmp_path / "latest").write_text(tag_for(3) + "\n")
    manager = CheckpointManager(tmp_path, rank=0)
    with pytest.raises(FileNotFoundError, match="cannot rewind to .*step_00000004: not a complete checkpoint"):
        manager.rewind(4)
    manager.rewind(2)
    assert manager.steps() == [2] and (tmp_path / "latest").read_text() == tag_for(2) + "\n"
    assert resolve_checkpoint(tmp_path) == manager.find("auto") == tmp_path / tag_for(2)


def test_a_rehearsal_that_does_not_fit_at_batch_1_is_refused_in_one_line_before_launching(tmp_path, monkeypatch):
    """ViT-e/14 (3.8B parameters) plans ~59 GB a process at ZeRO-2 and batch 1: with 8 GB available a process
    preflight refuses in one line naming the plan and the memory, launches nothing and writes nothing (it used to
    launch both ranks into the OOM killer)."""
    from vitscale.bench import preflight
    from vitscale.errors import VitscaleError

    launched = []
    monkeypatch.setattr(preflight, "available_bytes", lambda: 16 * 2 ** 30)
    monkeypatch.setattr(preflight, "run", lambda *a, **k: launched.append(a))
    config = str(Path(__file__).resolve().parents[1] / "configs" / "mae_vit_h14.yaml")
    with pytest.raises(VitscaleError) as e:
        preflight.preflight(config, ["model.name=vit_e_patch14"], tmp_path / "out", preemption=False)
    msg = str(e.value)
    assert "\n" not in msg and "vit_e_patch14 does not fit" in msg and "8.0 GB available a process" in msg, msg
    assert 55 < float(msg.split(" plan ")[1].split(" GB")[0]) < 62, msg
    assert launched == [] and not (tmp_path / "out").exists()


def test_sigterm_to_preflight_stops_the_launch_it_is_watching(tmp_path):
    """A stub launch (a shell and its `sleep`, in their own session as a deepspeed launch is) watched by
    launch_watch.run in a child Python; SIGTERM to that Python (timeout, scancel) must leave no process of the launch
    running (the launcher and its ranks used to outlive preflight), exit 143, and restore the previous handler."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    pids = tmp_path / "pids"
    script = (
        "import signal, sys\nfrom pathlib import Path\nfrom vitscale.bench.launch_watch import run\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "try:\n"
        f"    run(['bash', '-c', 'sleep 60 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait'], {{}}, "
        f"Path({str(tmp_path)!r}))\n"
        "finally:\n"
        "    print('handler restored', signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, flush=True)\n")
    watcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if pids.exists():
                break
            time.sleep(0.1)
        launch = [int(p) for p in pids.read_text().split()]
        assert all(psutil.pid_exists(p) for p in launch)
        watcher.send_signal(signal.SIGTERM)
        out, _ = watcher.communicate(timeout=30)
        time.sleep(0.5)
        alive = [p for p in launch if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert alive == [] and watcher.returncode == 128 + signal.SIGTERM, (alive, watcher.returncode)
        assert "handler restored True" in out, out
    finally:  # on failure, end the stub's group (only what this test started)
        watcher.kill()
        if pids.exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pids.read_text().split()[0]), signal.SIGKILL)


def test_an_indivisible_global_batch_is_refused_in_one_line_like_training(tmp_path, monkeypatch):
    """data.global_batch_size=4095 cannot be shared by 2 processes: preflight refuses with training's one-line
    ConfigError and launches nothing (it floored it to 2047 a process, then 2, without a word); 4096 gives 2048."""
    from vitscale.bench import preflight
    from vitscale.config.load import load_config
    from vitscale.errors import ConfigError

    launched = []
    monkeypatch.setattr(preflight, "run", lambda *a, **k: launched.append(a))
    config = str(Path(__file__).resolve().parents[1] / "configs" / "mae_vit_l16.yaml")
    with pytest.raises(ConfigError, match=r"^data.global_batch_size=4095 is not divisible by 2 process\(es\)"):
        preflight.preflight(config, ["data.global_batch_size=4095"], tmp_path / "out", preemption=False)
    assert launched == [] and not (tmp_path / "out").exists()
    even = preflight.rehearsal_overrides(load_config(config, ["data.global_batch_size=4096"]), cuda=True)
    assert "data.batch_size=2048" in even and "data.global_batch_size=null" in even
