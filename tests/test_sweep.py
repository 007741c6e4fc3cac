"""`vitscale sweep`: the grid, the table (mean +- std over seeds), resume, and one failing cell among good ones."""
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from conftest import DEMO, TINY, run_cli
from vitscale.logging.metrics import read_metrics
from vitscale.sweep.grid import SweepError, expand_grid, parse_axes
from vitscale.sweep.report import markdown, summarize


def test_axes_fixed_overrides_and_brace_patterns():
    axes, fixed = parse_axes(["model.depth=1,2", "train.steps=5", "data.train_shards=a-{0..3}.tar,b-{0,1}.tar"])
    assert axes == [("model.depth", ["1", "2"]), ("data.train_shards", ["a-{0..3}.tar", "b-{0,1}.tar"])]
    assert fixed == ["train.steps=5"]
    cells = expand_grid(axes, fixed, seeds=[7, 8])
    assert len(cells) == 8 and len({c.name for c in cells}) == 8
    assert cells[0].overrides() == ["train.steps=5", "model.depth=1", "data.train_shards=a-{0..3}.tar", "run.seed=7"]
    assert cells[0].group == cells[1].group != cells[2].group  # seeds of one grid point are neighbours
    for bad in (["model.depth"], ["model.depth=1,1"], ["run.seed=1,2"], ["model.depth=1,2", "model.depth=3"],
                ["a.depth=1,2", "b.depth=1,2"], ["model.depth=1,,2"]):
        with pytest.raises(SweepError):
            parse_axes(bad)


def test_summary_mean_and_sample_std_per_grid_point():
    cells = expand_grid([("model.depth", ["1", "2"])], [], seeds=[0, 1, 2])
    acc = {0: [0.5, 0.6, 0.7], 1: [0.9, 0.8]}
    results = []
    for i, c in enumerate(cells):
        group_index, seed_index = divmod(i, 3)
        ok = seed_index < len(acc[group_index])
        results.append({"name": c.name, "group": c.group, "params": dict(c.params), "seed": c.seed,
                        "status": "ok" if ok else "failed", "error": "boom",
                        "metrics": {"val_top1": acc[group_index][seed_index]} if ok else {}})
    s = summarize(results)
    row1, row2 = s["rows"]
    assert row1["n"] == 3 and row1["val_top1"]["mean"] == pytest.approx(0.6)
    assert row1["val_top1"]["std"] == pytest.approx(statistics.stdev([0.5, 0.6, 0.7]))
    assert row2["n"] == 2 and row2["val_top1"]["mean"] == pytest.approx(0.85) and row2["seeds"] == [0, 1]
    assert [f["name"] for f in s["failed"]] == [cells[5].name]
    md = markdown(s, "t")
    assert "| model.depth=1 | 3 | 0.6 ± 0.1 |" in md and "boom" in md


@pytest.mark.slow
def test_sweep_runs_grid_resumes_and_reports_a_failing_cell(tmp_path, data_cache):
    out = tmp_path / "sw"
    tiny = [o for o in TINY if not o.startswith("model.depth=")]
    args = ["sweep", "--config", DEMO, f"data.cache_dir={data_cache}", *tiny, "train.steps=4",
            "train.ckpt_every=4", "model.depth=1,2", "data.train_shards=demo:digits,/nope/x-{0..1}.tar",
            "--seeds", "2", "--out", str(out)]
    r = run_cli(args, cwd=tmp_path, timeout=900)
    assert r.returncode == 1, r.stdout + r.stderr  # failed cells make the exit status non-zero ...
    doc = json.loads((out / "sweep.json").read_text())
    good = [row for row in doc["rows"] if row["n"]]
    assert [row["group"] for row in good] == ["model.depth=1, data.train_shards=demo:digits",
                                              "model.depth=2, data.train_shards=demo:digits"]
    assert len(doc["failed"]) == 4 and all("/nope/x-" in f["error"] for f in doc["failed"])  # ... the rest ran
    for row in good:  # each number is the mean and spread of the cells' own metrics.jsonl
        assert row["n"] == 2 and row["seeds"] == [0, 1]
        finals = []
        for seed in (0, 1):
            name = f"depth-{row['params']['model.depth']}__train_shards-demo_digits__s{seed}"
            records = read_metrics(out / "cells" / name / "metrics.jsonl")
            finals.append([x for x in records if "loss" in x][-1]["loss"])
            assert any("val_top1" in x for x in records)
        assert row["train_loss"]["mean"] == pytest.approx(statistics.fmean(finals))
        assert row["train_loss"]["std"] == pytest.approx(statistics.stdev(finals)) and row["train_loss"]["std"] > 0
        assert 0.0 <= row["val_top1"]["mean"] <= 1.0
    assert "±" in (out / "sweep.md").read_text() and (out / "sweep.png").stat().st_size > 1000

    metrics = sorted(out.glob("cells/*__s0/metrics.jsonl"))
    before = {p: p.read_text() for p in metrics}
    again = run_cli(args, cwd=tmp_path, timeout=900)  # resume: finished cells are not trained again
    assert again.returncode == 1 and "4 of 8 cells already finished, running 4" in again.stdout
    assert {p: p.read_text() for p in metrics} == before
    assert json.loads((out / "sweep.json").read_text())["rows"] == doc["rows"]


def test_finetune_eval_needs_a_loadable_config_and_owns_init(tmp_path):
    from vitscale.sweep.run import SweepOptions, plan_sweep

    def plan(**kw):
        return plan_sweep(SweepOptions(config=DEMO, grid=["model.depth=1,2"], out=str(tmp_path), **kw))

    with pytest.raises(SweepError, match="--eval finetune needs --finetune-config"):
        plan(evals=["linear", "finetune"])
    with pytest.raises(SweepError, match="model.nope"):
        plan(evals=["finetune"], finetune_config=DEMO, finetune_overrides=["model.nope=1"])
    with pytest.raises(SweepError, match="--finetune-set model.init=x: the sweep sets"):
        plan(evals=["finetune"], finetune_config=DEMO, finetune_overrides=["model.init=x"])
    with pytest.raises(SweepError, match="only with --eval"):
        plan(evals=["linear"], finetune_config=DEMO)
    cells, p = plan(evals=["finetune"], finetune_config=DEMO, finetune_overrides=["train.steps=3"])
    assert len(cells) == 2 and p.finetune_config == DEMO and p.finetune_overrides == ["train.steps=3"]


def test_eval_names_timeout_and_quoted_commas_are_settled_before_any_cell_trains(tmp_path):
    """A misspelt --eval failed in every cell after its training; an alias (probes) ran but its results were looked
    for as probes.json and never found; --timeout -1 was taken; a quoted comma split one value into two cells."""
    from vitscale.sweep.run import SweepOptions, plan_sweep

    def plan(grid=("model.depth=1,2",), **kw):
        return plan_sweep(SweepOptions(config=DEMO, grid=list(grid), out=str(tmp_path), **kw))

    with pytest.raises(SweepError, match="--eval: unknown evaluation 'lienar'; did you mean linear"):
        plan(evals=["lienar"])
    assert plan(evals=["probes", "finetune"], finetune_config=DEMO)[1].evals == ["linear", "knn", "fewshot",
                                                                                "finetune"]
    with pytest.raises(SweepError, match="--timeout must be > 0 seconds, got -1"):
        plan(timeout_s=-1.0)
    cells, _ = plan(grid=['model.freeze="patch_embed,blocks.0"', "model.depth=1,2"])
    assert len(cells) == 2 and cells[0].overrides()[0] == 'model.freeze="patch_embed,blocks.0"'
    axes, _ = parse_axes(["model.freeze='patch_embed,blocks.0',head"])
    assert axes == [("model.freeze", ["'patch_embed,blocks.0'", "head"])]


@pytest.mark.slow
def test_sweep_finetunes_each_cell_from_its_own_run(tmp_path, data_cache):
    out = tmp_path / "sw"
    common = [f"data.cache_dir={data_cache}", *TINY, "train.ckpt_every=4"]
    ft = [f"--finetune-set={o}" for o in [*common, "train.steps=4", "train.eval_every=2", "optim.lr=1e-4"]]
    r = run_cli(["sweep", "--config", DEMO, *common, "train.steps=4", "--eval", "finetune", "--finetune-config", DEMO,
                 *ft, "--out", str(out)], cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cell = next((out / "cells").iterdir())
    log = (cell / "finetune.log").read_text()
    assert f"model.init={cell}" in log and "run.name=finetune" in log
    assert f"tensors loaded from {cell} (vitscale checkpoint" in log  # the cell's own pretrained weights
    records = read_metrics(cell / "finetune" / "metrics.jsonl")
    assert [x["step"] for x in records if "val_top1" in x] == [2, 4]  # train.eval_every=2 over 4 steps
    val = [x["val_top1"] for x in records if "val_top1" in x]
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["rows"][0]["n"] == 1 and doc["rows"][0]["finetune/val_top1"]["mean"] == pytest.approx(val[-1])
    assert {"val_top1", "finetune/val_top1"} <= set(doc["metrics"])  # the pretraining's own held-out numbers stay too


def test_eval_results_become_metrics_without_their_settings():
    from vitscale.sweep.runner import eval_metrics

    fewshot = {"evaluation": "fewshot", "results": {"trained": {
        "shots": [1, 5, 10], "mean": [0.5, 0.8, 0.9], "std": [0.1, 0.05, 0.01], "per_seed": [[0.4, 0.6]] * 3,
        "seeds": 5, "reg": 0.001}}}
    assert eval_metrics(fewshot) == {"fewshot/1-shot": 0.5, "fewshot/5-shot": 0.8, "fewshot/10-shot": 0.9}
    linear = {"evaluation": "linear", "results": {"trained": {"val_acc": 0.93, "train_acc": 0.96, "epochs": 100,
                                                              "lr": 0.1, "seed": 0, "history": [{"epoch": 1}]}}}
    # an eval file written before the metrics were renamed: its numbers arrive under today's names
    assert eval_metrics(linear) == {"linear/val_top1": 0.93, "linear/train_top1": 0.96}
    rows = summarize([{"name": "a", "group": "g", "params": {}, "seed": 0, "status": "ok",
                       "metrics": eval_metrics(fewshot)}])
    assert rows["metrics"] == ["fewshot/1-shot", "fewshot/5-shot", "fewshot/10-shot"]  # in numeric order


def test_parallel_cells_share_the_cores():
    import os

    from vitscale.sweep.runner import child_threads

    cores = os.cpu_count() or 1
    assert child_threads(1, {}) == {}
    assert child_threads(2, {}) == {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    assert child_threads(cores * 4, {}) == {"OMP_NUM_THREADS": "1"}
    assert child_threads(2, {"OMP_NUM_THREADS": "3"}) == {}  # the caller's choice stands


def test_long_values_keep_cells_and_seeds_apart():
    long = "p" * 160  # e.g. a model.init path or a shard spec longer than a cell name may be
    cells = expand_grid([("logging.wandb.project", [long + "A", long + "B"])], [], seeds=[0, 1])
    names = [c.name for c in cells]
    assert len(set(names)) == 4  # cut at 150 after the seed suffix, all four shared one folder
    assert all(len(n) <= 150 for n in names)
    assert [n[-4:] for n in names] == ["__s0", "__s1", "__s0", "__s1"]  # the seed stays readable
    assert names[0][:-4] == names[1][:-4] != names[2][:-4]  # one grid point's seeds differ only in their suffix
    assert expand_grid([("logging.wandb.project", [long + "A"])], [], seeds=[0])[0].name == names[0]  # stable
    assert expand_grid([("model.depth", ["1"])], [], seeds=[0])[0].name == "depth-1__s0"  # short names unchanged
    with pytest.raises(SweepError,
                       match=r"\(data.train_shards=a/b\) and \(data.train_shards=a:b\) would share the folder"):
        expand_grid([("data.train_shards", ["a/b", "a:b"])], [], seeds=[0])


def _fake_training(calls: list):
    """Stands in for the child `vitscale train` (the sweep's bookkeeping is under test, not training): its final
    loss is 1 / train.steps, so a reused result shows which settings made it."""
    def child(plan, args, log_path):
        given = dict(a.split("=", 1) for a in args if "=" in a)
        calls.append(given["run.name"])
        steps = int(given["train.steps"])
        (log_path.parent / "metrics.jsonl").write_text(json.dumps({"step": steps, "loss": 1 / steps}) + "\n")
        return None
    return child


def test_relaunch_with_other_settings_is_refused_and_an_unchanged_one_resumes(tmp_path, monkeypatch):
    from vitscale.config.load import load_config, save_config
    from vitscale.sweep import runner
    from vitscale.sweep.run import SweepOptions, sweep

    calls: list = []
    monkeypatch.setattr(runner, "_child", _fake_training(calls))
    out = tmp_path / "sw"

    def launch(*shared):
        opts = SweepOptions(config=DEMO, grid=["optim.lr=1e-3,2e-3", *shared], out=str(out))
        return sweep(opts, log=lambda _: None)

    first = launch("train.steps=3")
    assert len(calls) == 2 and first["rows"][0]["train_loss"]["mean"] == pytest.approx(1 / 3)
    report = (out / "sweep.json").read_text()
    with pytest.raises(SweepError, match=r"lr-1e-3__s0 \(and 1 more cells of .*\) was run with other settings "
                                         r"\(optim\.weight_decay 0\.05 -> 0\.3, train\.steps 3 -> 6\).*new --out"):
        launch("train.steps=6", "optim.weight_decay=0.3")  # was: both cells reused, reported as 6-step results
    with pytest.raises(SweepError, match=r"--eval \"\" -> knn"):
        sweep(SweepOptions(config=DEMO, grid=["optim.lr=1e-3,2e-3", "train.steps=3"], out=str(out), evals=["knn"]))
    assert len(calls) == 2 and (out / "sweep.json").read_text() == report  # nothing ran, nothing rewritten

    same = launch("train.steps=3", "optim.weight_decay=0.050")  # the config's own value, spelled out: same settings
    assert same["rows"] == first["rows"] and len(calls) == 2  # kept
    older = out / "cells" / "lr-1e-3__s0" / "sweep_cell.json"
    doc = json.loads(older.read_text())
    del doc["settings"]["model.head_norm"]  # recorded by a vitscale without that key: not a difference
    older.write_text(json.dumps(doc))
    assert launch("train.steps=3")["rows"] == first["rows"] and len(calls) == 2
    record = out / "cells" / "lr-2e-3__s0" / "sweep_cell.json"
    killed = {**json.loads(record.read_text()), "status": "running"}  # what a sweep killed mid-cell leaves
    record.write_text(json.dumps(killed))
    launch("train.steps=3")
    assert calls[2:] == ["lr-2e-3__s0"]  # the interrupted cell runs again (its training resumes), the other is kept

    # folders of a vitscale before these records: the run's own config.yaml says what it was trained with (one
    # without a config.yaml never reached training: nothing to compare)
    for cell in ("lr-1e-3__s0", "lr-2e-3__s0"):
        path = out / "cells" / cell / "sweep_cell.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "settings"}))
    save_config(load_config(DEMO, ["optim.lr=2e-3", "train.steps=3"]), record.parent / "config.yaml")
    with pytest.raises(SweepError, match=r"lr-2e-3__s0 was run with other settings \(train\.steps 3 -> 4\)"):
        launch("train.steps=4")


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its (new) parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.slow
def test_a_killed_sweep_takes_its_training_with_it(tmp_path, data_cache):
    cell = tmp_path / "sw" / "cells" / "s0"
    args = [sys.executable, "-m", "vitscale", "sweep", "--config", DEMO, f"data.cache_dir={data_cache}", *TINY,
            "data.val_shards=null", "train.steps=100000", "--out", str(tmp_path / "sw")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    parent = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer = None
    try:
        assert _wait_for(lambda: '"step"' in _text(cell / "metrics.jsonl"), 300), _text(cell / "train.log")
        trainer = json.loads((cell / "WRITER.lock").read_text())["pid"]  # the cell's training, holding its lock
        assert _running(trainer)
        parent.send_signal(signal.SIGKILL)  # no handler runs: the OOM killer, kill -9
        parent.wait()
        assert _wait_for(lambda: not _running(trainer), 30)  # was: it trained on, holding WRITER.lock
    finally:
        parent.kill()
        parent.wait()
        if trainer is not None and _running(trainer):
            os.kill(trainer, signal.SIGKILL)


def _text(path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_cells_start_as_processes_of_their_own_under_any_launcher():
    """A sweep started under srun or mpirun handed its cells the task's rank variables, which distributed/env.py
    reads: each cell became a rank of a larger world that never assembles."""
    from vitscale.distributed.env import detect_env
    from vitscale.sweep.runner import launcher_free

    for launched in ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77"},
                     {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
                     {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"},
                     {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1"}):
        env = launcher_free({**launched, "PATH": "/bin"})
        assert detect_env(env).world_size == 1 and detect_env(env).rank == 0, launched
        assert env["PATH"] == "/bin" and env.get("SLURM_JOB_ID") == launched.get("SLURM_JOB_ID")


def test_a_folder_from_before_records_is_not_compared_on_what_training_resolved(tmp_path):
    """A cell folder of a vitscale before settings records is compared with its run's config.yaml, which train
    wrote resolved (train.steps from train.epochs, the warmup, data.batch_size from a global batch): an unchanged
    relaunch of a recipe with optim.warmup_steps=null was refused ('optim.warmup_steps 100 -> null')."""
    from vitscale.config.load import load_config, save_config
    from vitscale.config.resolve import resolve
    from vitscale.sweep.runner import SweepPlan, cell_dir, train_overrides
    from vitscale.sweep.run import validate_cells
    from vitscale.sweep.settings import check_recorded

    plan = SweepPlan(config=DEMO, out=tmp_path / "sw")
    for shared in (["optim.warmup_steps=null", "data.num_workers=2"], ["data.global_batch_size=128"]):
        cells = expand_grid([("objective.label_smoothing", ["0.1"])], shared, [0])
        for cell in cells:  # what an older vitscale left: the resolved config.yaml, a result without settings
            folder = cell_dir(plan, cell)
            folder.mkdir(parents=True, exist_ok=True)
            save_config(resolve(load_config(DEMO, train_overrides(plan, cell)), 1, need_length=False).cfg,
                        folder / "config.yaml")
            (folder / "sweep_cell.json").write_text(json.dumps({"name": cell.name, "status": "ok", "metrics": {}}))
        validate_cells(plan, cells)
        check_recorded(plan, cells)  # the same command: kept
        relaunch = expand_grid([("objective.label_smoothing", ["0.1"])], [*shared, "data.num_workers=1"], [0])
        validate_cells(plan, relaunch)
        check_recorded(plan, relaunch)  # fewer workers (after an OOM kill): how it runs, not what it computes
    changed = expand_grid([("objective.label_smoothing", ["0.1"])], ["data.global_batch_size=128",
                                                                      "optim.warmup_steps=7"], [0])
    validate_cells(plan, changed)
    with pytest.raises(SweepError, match=r"optim.warmup_steps 30 -> 7"):  # set by this command: compared
        check_recorded(plan, changed)


ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefg", "bcdefgh")) + "i: {x: *h}\n"


@pytest.mark.parametrize("record, config_yaml", ids=range(9), argvalues=[
    ("[1, 2]", None), ('"ok"', None), ("[" * 100_000, None), (b'{"status": "ok"\xff}', None), ("", None),
    ('{"status": "ok", "settings": [1]}', ALIAS_BOMB), ("null", "a: " + "[" * 5000),
    ("[1]", "a:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(5000))), ("[1]", b"a: \xff\n")])
def test_damaged_cell_records_are_no_record_said_once(tmp_path, capsys, monkeypatch, record, config_yaml):
    from vitscale.sweep import runner
    from vitscale.sweep.runner import RESULT, SweepPlan, cell_dir, load_result
    from vitscale.sweep.settings import check_recorded, recorded_settings

    monkeypatch.setattr(runner, "_NOTED", set())  # once per process: this test's files are new to it

    plan = SweepPlan(config=DEMO, out=tmp_path / "sw")
    cell = expand_grid([("optim.lr", ["1e-3"])], [], [0])[0]
    folder = cell_dir(plan, cell)
    folder.mkdir(parents=True)
    for name, text in ((RESULT, record), ("config.yaml", config_yaml)):
        if text is not None:
            (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    plan.settings[cell.name] = {"optim.lr": 0.001}
    start = time.time()
    # before: AttributeError, RecursionError, UnicodeDecodeError, or a YAML alias bomb flattened for minutes
    assert recorded_settings(plan, cell, plan.settings[cell.name]) is None
    check_recorded(plan, [cell])
    assert load_result(plan, cell) in (None, {"status": "ok", "settings": [1]}) and time.time() - start < 10
    lines = capsys.readouterr().err.splitlines()  # said once per file, though each file was read three times
    assert lines and len(lines) == len(set(lines)) and len(lines) <= 2
    assert all(str(folder) in ln and "taken as no record" in ln and len(ln) < 600 for ln in lines)


@pytest.mark.parametrize("doc", ids=range(5), argvalues=["[1]", "[" * 100_000, "{", '{"results": [1]}',
                                                         '{"results": {"trained": [1, 2]}}'])
def test_a_damaged_eval_result_is_no_metrics_naming_the_file(tmp_path, capsys, doc):
    from vitscale.sweep.runner import SweepPlan, cell_metrics

    folder = tmp_path / "cell"
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "linear.json").write_text(doc)
    assert cell_metrics(SweepPlan(config=DEMO, out=tmp_path, evals=["linear"]), folder) == {}
    err = capsys.readouterr().err
    assert err == "" or ("linear.json" in err and err.count("\n") == 1)
