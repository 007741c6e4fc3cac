"""Faults 8 and 9: a bad config, or a checkpoint written for another model, stops the run before it writes
anything, with one line that names the problem."""
import pytest

from conftest import DEMO, copy_run, run_cli, train_args


@pytest.mark.parametrize("overrides, expected", [
    (["data.batchsize=8"], "unknown config key 'data.batchsize' (did you mean 'data.batch_size'?)"),
    (["train.steps=abc"], "config key 'train.steps' got 'abc' (str), expected int or null"),
    (["data.global_batch_size=100", "train.grad_accum=3"],
     "data.global_batch_size=100 is not divisible by 1 process(es) x train.grad_accum=3 = 3"),
    (["data.train_shards=/no/such/dir/train-{000000..000007}.tar"],
     "shard spec: no such file: /no/such/dir/train-000000.tar"),
], ids=["unknown-key", "wrong-type", "global-batch-not-divisible", "missing-shards"])
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, overrides, expected):
    r = run_cli(["train", "--config", DEMO, f"run.dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
                 *overrides], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"vitscale: error: {expected}"
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no run dir, no data cache: nothing written


def test_checkpoint_of_another_model_is_refused(tmp_path, data_cache, trained_run):
    copy_run(trained_run, tmp_path, "m")  # checkpoints at steps 2 and 4
    config = (tmp_path / "m" / "config.yaml").read_text()
    r = run_cli(train_args(tmp_path, "m", data_cache, "train.steps=4", "model.depth=3", "model.embed_dim=96"),
                cwd=tmp_path)
    assert r.returncode == 2
    ckpt = tmp_path / "m" / "checkpoints" / "step_00000004"
    assert r.stderr.strip().splitlines()[-1] == (
        f"vitscale: error: checkpoint {ckpt} was written for another model (model.embed_dim=64 there, 96 here; "
        "model.depth=2 there, 3 here): use a new run.name to start fresh, or train.resume=never")
    assert (tmp_path / "m" / "config.yaml").read_text() == config  # untouched
    assert sorted(p.name for p in (tmp_path / "m" / "checkpoints").glob("step_*")) == ["step_00000002",
                                                                                      "step_00000004"]


@pytest.mark.parametrize("override, diff", [
    ("optim.name=sgd", "optim.name='adamw' there, 'sgd' here"),
    ("optim.layer_decay=0.75", "optim.layer_decay=1.0 there, 0.75 here"),
    ("model.freeze=encoder", "model.freeze='' there, 'encoder' here"),
    ("train.precision=bf16", "train.precision='fp32' there, 'bf16' here"),
], ids=["optimizer", "layer-decay-groups", "freeze", "precision"])
def test_a_checkpoint_whose_optimizer_state_this_config_cannot_load_is_refused(tmp_path, data_cache, trained_run,
                                                                              override, diff):
    """These used to fail inside DeepSpeed's load with a traceback (KeyError 'momentum', a parameter-alignment
    RuntimeError, KeyError 'cls_token', a missing bf16_zero_pp_rank file), after config.yaml was overwritten."""
    copy_run(trained_run, tmp_path, "m")
    config = (tmp_path / "m" / "config.yaml").read_text()
    r = run_cli(train_args(tmp_path, "m", data_cache, "train.steps=6", override), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    ckpt = tmp_path / "m" / "checkpoints" / "step_00000004"
    assert r.stderr.strip().splitlines()[-1] == (
        f"vitscale: error: checkpoint {ckpt} holds optimizer state this config cannot load ({diff}): resume with "
        f"the checkpoint's values, or start a new run from its weights with model.init={ckpt}")
    assert (tmp_path / "m" / "config.yaml").read_text() == config  # untouched
