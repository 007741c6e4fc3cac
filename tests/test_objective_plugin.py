"""A third objective, defined in this file alone, runs through vitscale with no change anywhere else.

Rotation prediction (Gidaris et al. 2018): each image is turned by 0, 90, 180 or 270 degrees and the ViT's 4-way
head says which. The config names it by import path (``objective.name=test_objective_plugin:Rotation``), which
is how every process a launcher starts finds it. The chain: train (checkpoints) -> resume -> export -> ``eval
probes`` on the exported encoder -> ``plan``.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEMO, ROOT, TINY, run_cli
from vitscale.models import create_model
from vitscale.models.flops import forward_flops
from vitscale.objectives.base import Objective, model_kwargs

NAME = "test_objective_plugin:Rotation"


class Rotation(Objective):
    """Predict which quarter turn an image was given; labels of the data are not used."""
    name = NAME

    def build_model(self, num_classes: int) -> nn.Module:
        m = self.cfg.model
        model = create_model(m.name, num_classes=4, global_pool=m.global_pool, **model_kwargs(self.cfg))
        model.set_grad_checkpointing(m.grad_checkpointing)
        return model

    def flops_per_image(self, model: nn.Module) -> float:
        return 3 * forward_flops(model)

    def __call__(self, model, images, labels):
        turns = torch.arange(len(images), device=images.device) % 4
        rotated = torch.stack([torch.rot90(x, int(k), dims=(-2, -1)) for x, k in zip(images, turns)])
        logits = model(rotated)
        loss = F.cross_entropy(logits.float(), turns)
        return loss, {"rot_acc": (logits.argmax(-1) == turns).float().mean().detach()}

    def eval_sums(self, model, images, labels):
        with torch.no_grad():
            loss, _ = self(model, images, labels)
        return {"loss": float(loss) * len(images)}


class RegroupedRotation(Rotation):
    """Rotation whose model, under VITSCALE_TEST_OLD_GROUPS=1, decays its position table and [CLS] token (as an
    objective's wrapper model did before no_weight_decay() was read from every submodule): a checkpoint written so
    holds optimizer groups of other sizes than the model makes now."""
    name = "test_objective_plugin:RegroupedRotation"

    def build_model(self, num_classes: int) -> nn.Module:
        model = super().build_model(num_classes)
        if os.environ.get("VITSCALE_TEST_OLD_GROUPS") == "1":
            model.no_weight_decay = lambda: set()
        return model


def _env() -> dict:
    # This file's directory on the path of every process (CI runs pytest without PYTHONPATH).
    return {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _train(root: Path, cache: Path, steps: int):
    args = ["train", "--config", DEMO, f"run.dir={root}", "run.name=rot", f"data.cache_dir={cache}", *TINY,
            f"objective.name={NAME}", f"train.steps={steps}", "train.ckpt_every=2", "train.keep_last=0"]
    r = run_cli(args, cwd=root, env_extra=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in (root / "rot" / "metrics.jsonl").read_text().splitlines()]


def test_a_third_objective_in_one_file_trains_resumes_exports_probes_and_plans(tmp_path, data_cache, monkeypatch):
    monkeypatch.delenv("VITSCALE_OBJECTIVES", raising=False)  # an earlier test's config may have trusted one here
    # train: 4 steps, checkpoints at 2 and 4; the objective's own metric is logged
    first = _train(tmp_path, data_cache, 4)
    steps = [r for r in first if "train/rot_acc" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(0.0 <= r["train/rot_acc"] <= 1.0 and r["loss"] > 0 for r in steps)
    assert (tmp_path / "rot" / "checkpoints" / "step_00000004" / "COMPLETE").is_file()

    # resume: the run continues from step 4 to 6 (not from scratch)
    second = _train(tmp_path, data_cache, 6)
    resumed = [r["step"] for r in second if "train/rot_acc" in r]
    assert resumed[-2:] == [5, 6] and resumed.count(1) == 1  # step 1 logged once: the second launch resumed

    # export: the whole model (the default part), with the objective's name in the metadata
    out = tmp_path / "rot.safetensors"
    r = run_cli(["export", str(tmp_path / "rot"), str(out)], cwd=tmp_path, env_extra=_env())
    assert r.returncode == 2 and f"VITSCALE_OBJECTIVES={NAME}" in r.stderr  # a file's name alone imports nothing
    trusted = {**_env(), "VITSCALE_OBJECTIVES": NAME}
    r = run_cli(["export", str(tmp_path / "rot"), str(out)], cwd=tmp_path, env_extra=trusted)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("head.weight").shape[0] == 4
    assert meta["vitscale_objective"] == NAME and meta["vitscale_part"] == "full" and meta["step"] == "6"

    # eval probes on frozen features of the exported model (its own pooling: the default "model")
    r = run_cli(["eval", "knn", str(out), "--data", "demo:digits", "--cache-dir", str(data_cache), "--out",
                 str(tmp_path / "eval")], cwd=tmp_path, env_extra=trusted)
    assert r.returncode == 0, r.stderr[-3000:]
    knn = json.loads((tmp_path / "eval" / "knn.json").read_text())
    assert knn["pool"] == "model" and knn["model"]["objective"] == NAME
    acc = knn["results"]["trained"]["val_top1"]
    assert 0.2 < acc <= 1.0, acc  # 10 digit classes (chance 0.1); measured 0.66 after 6 rotation steps

    # plan: the objective's model (a 4-class head) is what the planner sizes
    r = run_cli(["plan", "--config", DEMO, *TINY, f"objective.name={NAME}", "--gpus", "1"], cwd=tmp_path,
                env_extra=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "classifier head: 4 classes (the objective)" in r.stdout
    assert "ZeRO-0" in r.stdout and "ZeRO-3" in r.stdout


def test_an_unknown_objective_is_one_line(tmp_path):
    r = run_cli(["train", "--config", DEMO, f"run.dir={tmp_path}", "objective.name=no_such_module:Nope"],
                cwd=tmp_path)
    assert r.returncode != 0 and "objective.name='no_such_module:Nope' cannot be imported" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing written
    assert sys.modules.get("no_such_module") is None


class PixelMean(Objective):
    """A model around a ViT (``encoder``) with a pixel decoder of its own: each patch's mean colour from the
    encoder's tokens. What a SimMIM-like objective looks like to vitscale."""
    name = "test_objective_plugin:PixelMean"

    def build_model(self, num_classes: int) -> nn.Module:
        return PixelMeanModel(create_model(self.cfg.model.name, num_classes=0, **model_kwargs(self.cfg)))

    @staticmethod
    def encoder(model: nn.Module) -> nn.Module:
        return model.encoder

    def flops_per_image(self, model: nn.Module) -> float:
        return 3 * forward_flops(model.encoder)

    def __call__(self, model, images, labels):  # model: the engine around PixelMeanModel (its forward only)
        pred = model(images)
        side = int(pred.shape[1] ** 0.5)
        target = F.adaptive_avg_pool2d(images.float(), side).flatten(2).transpose(1, 2)  # (B, patches, 3)
        return F.mse_loss(pred.float(), target), {}

    def eval_sums(self, model, images, labels):
        with torch.no_grad():
            loss, _ = self(model, images, labels)
        return {"loss": float(loss) * len(images)}

    @classmethod
    def export_part(cls, state_dict, full):
        if full:
            return state_dict, "full"
        return {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}, "encoder"


class PixelMeanModel(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = nn.Linear(encoder.embed_dim, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:])


def test_bench_skips_timm_for_a_model_that_is_not_a_plain_vit(capsys):
    """bench's timm reference is a plain ViT; for a wrapper model it failed with AttributeError ('...Model' object
    has no attribute 'patch_embed'). The timm row is skipped with one line, the rest runs."""
    from vitscale.bench.speed import run_bench
    from vitscale.config.load import load_config

    cfg = load_config(DEMO, [*TINY, f"objective.name={PixelMean.name}"])
    res = run_bench(cfg, ("model",), iters=1, warmup=0, rounds=1)
    assert set(res["modes"]) == {"model"} and res["modes"]["model"]["img_per_s"] > 0
    assert "bench: objective 'test_objective_plugin:PixelMean' builds a PixelMeanModel, not a plain ViT, and names " \
           "no timm_reference of its own: the timm row is skipped" in capsys.readouterr().out


def test_model_init_from_a_wrapper_objectives_run_takes_the_part_it_exports(monkeypatch):
    """model.init=RUN of a run whose model wraps the ViT with a decoder of its own failed ('unexpected
    decoder.bias, decoder.weight'); the part the objective's export_part names is what a plain ViT starts from."""
    from vitscale.config.load import load_config
    from vitscale.objectives import objective_for
    from vitscale.weights import init as weights_init
    from vitscale.weights.sources import Weights, WeightsError

    cfg = load_config(DEMO, [*TINY, f"objective.name={PixelMean.name}"])
    torch.manual_seed(0)
    trained = PixelMean(cfg).build_model(0).state_dict()
    run = Weights(trained, "runs/pm", "checkpoint", objective=PixelMean.name, part="full", step=4,
                  checkpoint="runs/pm/checkpoints/step_00000004")
    monkeypatch.setattr(weights_init, "read_weights", lambda path: run)
    vit = load_config(DEMO, TINY)
    build = lambda: create_model(vit.model.name, num_classes=10, **model_kwargs(vit))  # noqa: E731
    plan = weights_init.plan_init("runs/pm", build)
    assert "its encoder (test_objective_plugin:PixelMean's export_part; 2 tensors of its own left out)" in plan.report
    model = build()
    plan.apply(model, log=lambda line: None)
    for name, value in model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, trained["encoder." + name]), name
    mae = objective_for(load_config(DEMO, [*TINY, "objective.name=mae"]))  # the same encoder, a decoder of its own
    with pytest.raises(WeightsError, match="unexpected decoder.bias, decoder.weight"):  # the whole must fit it
        weights_init.plan_init("runs/pm", lambda: mae.build_model(0))
    monkeypatch.setattr(PixelMean, "export_part", classmethod(lambda cls, sd, full: (sd, "full")))
    with pytest.raises(WeightsError, match="unexpected decoder.bias, decoder.weight"):  # no part named: as before
        weights_init.plan_init("runs/pm", build)


@pytest.mark.parametrize("recorded", [True, False])
def test_a_checkpoint_of_other_optimizer_groups_is_one_line_before_the_load(tmp_path, data_cache, recorded):
    """A checkpoint whose optimizer groups the model no longer makes: refused in one line naming model.init,
    from the layout the checkpoint records (before DeepSpeed's load), or, for a checkpoint older than that
    record, from the error the load raises."""
    args = ["train", "--config", DEMO, f"run.dir={tmp_path}", "run.name=rg", f"data.cache_dir={data_cache}", *TINY,
            f"objective.name={RegroupedRotation.name}", "train.steps=2", "train.ckpt_every=2"]
    r = run_cli(args, cwd=tmp_path, env_extra={**_env(), "VITSCALE_TEST_OLD_GROUPS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "rg" / "checkpoints" / "step_00000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert len(state["param_groups"]) == 2 and sum(state["param_groups"]) > 0
    if not recorded:  # as vitscale wrote it before the layout was recorded
        del state["param_groups"]
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        marker = json.loads((ckpt / "COMPLETE").read_text())  # its size is recorded: keep the checkpoint complete
        marker["files"]["trainer_state.json"] = (ckpt / "trainer_state.json").stat().st_size
        (ckpt / "COMPLETE").write_text(json.dumps(marker))
    r = run_cli([*args[:-2], "train.steps=4"], cwd=tmp_path, env_extra=_env())
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "parameter group" in lines[-1] and "model.init=" in lines[-1], lines[-3:]


def test_a_file_naming_a_plugin_objective_imports_nothing_until_the_user_names_it(tmp_path, monkeypatch):
    """Weights whose metadata names some.module:Class ran that module's top-level code on loading (eval, analyze,
    export, model.init). Now: one line saying how to trust it, and nothing imported; named, it loads."""
    from safetensors.torch import save_file

    from vitscale.errors import ConfigError
    from vitscale.weights import load_model

    (tmp_path / "side_effect_objective.py").write_text(
        f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\n"
        "from test_objective_plugin import Rotation as R\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("VITSCALE_OBJECTIVES", raising=False)
    model = create_model("vit_micro_patch4", img_size=32, num_classes=4)
    meta = {"vitscale_model": json.dumps({"name": "vit_micro_patch4", "img_size": 32}),
            "vitscale_objective": "side_effect_objective:R", "vitscale_part": "full", "step": "1"}
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(ConfigError, match="VITSCALE_OBJECTIVES=side_effect_objective:R"):
        load_model(tmp_path / "m.safetensors")
    assert not (tmp_path / "IMPORTED").exists() and "side_effect_objective" not in sys.modules
    monkeypatch.setenv("VITSCALE_OBJECTIVES", "other:X, side_effect_objective:R")
    loaded, info = load_model(tmp_path / "m.safetensors")
    assert (tmp_path / "IMPORTED").exists() and info["objective"] == "side_effect_objective:R"
    sys.modules.pop("side_effect_objective", None)
