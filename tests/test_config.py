"""Config: one schema, YAML + key=value overrides, one-line errors that name the key (through the CLI, with
nothing written: tests/faults/test_bad_config.py)."""
from pathlib import Path

import pytest

from vitscale.config.load import all_keys, load_config
from vitscale.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_loads_with_overrides():
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.steps=600", "run.name=longer", "optim.lr=1e-3"])
    assert cfg.train.steps == 600 and cfg.run.name == "longer"
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.model.img_size == 32  # from the file; untouched by overrides


@pytest.mark.parametrize("override, expected", [
    ("data.batchsize=8", "unknown config key 'data.batchsize' (did you mean 'data.batch_size'?)"),
    ("batch_size=8", "unknown config key 'batch_size' (did you mean 'data.batch_size'?)"),
    ("modle.name=x", "unknown config key 'modle.name' (did you mean 'model.name'?)"),
])
def test_unknown_key_names_closest(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == expected


@pytest.mark.parametrize("override, words", [
    ("train.steps=abc", ["train.steps", "'abc'", "int"]),
    ("model.grad_checkpointing=abc", ["model.grad_checkpointing", "'abc'", "bool or int"]),
    ("model.grad_checkpointing=-2", ["model.grad_checkpointing", "-2", ">= 0"]),
    ("train.precision=fp8", ["train.precision", "fp8", "bf16"]),
    ("data.batch_size=0", ["data.batch_size", ">= 1"]),
])
def test_wrong_type_names_key_value_and_type(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_text_keys_keep_the_text_yaml_would_convert():
    cfg = load_config(None, ["run.name=off", "data.val_shards=2024", "logging.wandb.entity=yes", "train.steps=7"])
    assert (cfg.run.name, cfg.data.val_shards, cfg.logging.wandb.entity) == ("off", "2024", "yes")
    assert cfg.train.steps == 7 and load_config(None, ["logging.wandb.entity=null"]).logging.wandb.entity is None


def test_unknown_key_inside_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"'optim.weight_decy' \(did you mean 'optim.weight_decay'\?\)"):
        load_config(f)


def test_every_schema_key_is_overridable():
    keys = all_keys()
    assert "data.train_shards" in keys and "logging.wandb.mode" in keys
    for key in ["run.seed=3", "engine.zero_stage=3", "logging.wandb.mode=offline", "optim.lr=null"]:
        load_config(None, [key])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_builds(path):
    """Recipes stay in step with the schema and the model registry (built on the meta device: no memory)."""
    import torch

    from vitscale.objectives import build_model

    cfg = load_config(path)
    with torch.device("meta"):
        model = build_model(cfg, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert "vitscale train" in path.read_text() or "launch/" in path.read_text()  # header says how to launch


def test_mae_decoder_keys_reach_the_model():
    import torch

    from vitscale.objectives import build_model

    cfg = load_config(ROOT / "configs/demo_mae.yaml", ["model.decoder_embed_dim=64", "model.decoder_depth=1",
                                                       "model.decoder_num_heads=2"])
    with torch.device("meta"):
        m = build_model(cfg, 0)
    assert (m.decoder_embed_dim, len(m.decoder_blocks), m.decoder_num_heads) == (64, 1, 2)
    with torch.device("meta"):
        default = build_model(load_config(ROOT / "configs/demo_mae.yaml"), 0)
    assert (default.decoder_embed_dim, len(default.decoder_blocks)) == (128, 2)  # the micro variant's decoder


def _meta_model(path, overrides, num_classes=10):
    import torch

    from vitscale.objectives import build_model

    with torch.device("meta"):
        return build_model(load_config(ROOT / path, overrides), num_classes)


@pytest.mark.parametrize("kind, requires_grad", [("learn", True), ("sincos", False)])
def test_pos_embed_key_reaches_the_vit(kind, requires_grad):
    m = _meta_model("configs/demo.yaml", [f"model.pos_embed={kind}"])
    assert m.pos_embed_type == kind and m.pos_embed.requires_grad is requires_grad
    assert tuple(m.pos_embed.shape) == (1, 64 + 1, 128)  # 8x8 patches + [CLS], micro width
    assert _meta_model("configs/demo.yaml", ["model.pos_embed=none"]).pos_embed is None
    assert _meta_model("configs/demo.yaml", []).pos_embed_type == "learn"  # null keeps the ViT's default


def test_class_token_and_other_model_keys_reach_the_model():
    import torch

    from vitscale.objectives import build_model

    cfg = load_config(ROOT / "configs/demo.yaml", [
        "model.class_token=false", "model.global_pool=avg", "model.mlp_ratio=2", "model.qkv_bias=false",
        "model.init_values=0.1", "model.fc_norm=false", "model.drop_rate=0.1", "model.attn_drop_rate=0.2",
        "model.proj_drop_rate=0.3"])
    m = build_model(cfg, 10)  # on the CPU: LayerScale's initial values are real numbers
    assert m.cls_token is None and m.num_prefix_tokens == 0 and tuple(m.pos_embed.shape) == (1, 64, 128)
    blk = m.blocks[0]
    assert blk.mlp.fc1.out_features == 256 and blk.attn.qkv.bias is None
    assert torch.equal(blk.ls1.gamma.detach(), torch.full((128,), 0.1))
    assert isinstance(m.fc_norm, torch.nn.Identity) and not isinstance(m.norm, torch.nn.Identity)  # fc_norm off
    assert isinstance(_meta_model("configs/demo.yaml", ["model.class_token=false", "model.global_pool=avg"]).norm,
                      torch.nn.Identity)  # null: timm's choice for avg pooling (norm after pooling)
    assert (m.pos_drop.p, blk.attn.attn_drop.p, blk.attn.proj_drop.p) == (0.1, 0.2, 0.3)
    assert m.head.out_features == 10 and m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_qk_norm_and_register_keys_reach_vit_and_mae():
    import torch

    vit = _meta_model("configs/demo.yaml", ["model.qk_norm=true", "model.reg_tokens=4"])
    assert vit.num_prefix_tokens == 5 and isinstance(vit.blocks[0].attn.q_norm, torch.nn.LayerNorm)
    mae = _meta_model("configs/demo_mae.yaml", ["model.qk_norm=true", "model.reg_tokens=2"], 0)
    assert mae.encoder.reg_token.shape[1] == 2 and mae.num_prefix_tokens == 3
    assert isinstance(mae.encoder.blocks[0].attn.k_norm, torch.nn.LayerNorm)
    assert isinstance(mae.decoder_blocks[0].attn.k_norm, torch.nn.Identity)  # the decoder stays the paper's


def test_mae_model_keys_reach_encoder_and_decoder():
    m = _meta_model("configs/demo_mae.yaml", ["model.pos_embed=learn", "model.class_token=false",
                                              "model.decoder_mlp_ratio=2", "objective.mask_ratio=0.5"], 0)
    assert m.encoder.pos_embed_type == "learn" and m.encoder.pos_embed.requires_grad
    assert m.encoder.cls_token is None and m.num_prefix_tokens == 0
    assert m.decoder_blocks[0].mlp.fc1.out_features == 2 * m.decoder_embed_dim and m.mask_ratio == 0.5
    assert _meta_model("configs/demo_mae.yaml", [], 0).encoder.pos_embed_type == "sincos"  # the paper's default


@pytest.mark.parametrize("overrides, words", [
    (["model.pos_embed=rope"], ["model.pos_embed", "learn, sincos, none"]),
    (["model.class_token=false"], ["model.class_token=false", "model.global_pool=avg"]),
    (["model.mlp_ratio=0"], ["model.mlp_ratio", "> 0"]),
    (["model.attn_drop_rate=1.0"], ["model.attn_drop_rate", "[0, 1)"]),
    (["model.reg_tokens=-1"], ["model.reg_tokens", ">= 0"]),
    (["engine.ds_config.gradient_accumulation_steps=4"], ["engine.ds_config.gradient_accumulation_steps",
                                                          "use train.grad_accum"]),
    (["engine.ds_config.zero_optimization.stage=3"], ["zero_optimization.stage", "use engine.zero_stage"]),
    (["engine.ds_config.zero_optimization=1"], ["engine.ds_config.zero_optimization", "engine.zero_stage"]),
    (["engine.ds_config.bf16.enabled=false"], ["bf16.enabled", "use train.precision"]),
    (["engine.ds_config.train_micro_batch_size_per_gpu=8"], ["use data.batch_size"]),
])
def test_bad_model_and_shadowing_ds_config_keys_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", overrides)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_ds_config_keys_no_schema_key_sets_are_allowed():
    cfg = load_config(None, ["engine.ds_config.zero_optimization.reduce_bucket_size=50000",
                             "engine.ds_config.fp16.loss_scale_window=500"])
    assert cfg.engine.ds_config == {"zero_optimization": {"reduce_bucket_size": 50000},
                                    "fp16": {"loss_scale_window": 500}}


def test_ds_config_overrides_of_values_vitscale_sets_keep_their_kind():
    """DeepSpeed checks the types of some keys at initialize and of others never: steps_per_print="abc" failed
    with a TypeError at the first step, after the run had started writing."""
    from vitscale.distributed.ds_config import build_ds_config

    for override, words in (("steps_per_print=abc", "steps_per_print must be a number"),
                            ("wall_clock_breakdown=2", "wall_clock_breakdown must be true or false"),
                            ("zero_optimization.contiguous_gradients=yes!", "must be true or false")):
        with pytest.raises(ConfigError, match=words):
            build_ds_config(load_config(None, [f"engine.ds_config.{override}"]), 1)
    # YAML reads 5e8 as a string (it wants 5.0e+8): a number where vitscale's value is one
    ds = build_ds_config(load_config(None, ["engine.ds_config.zero_optimization.reduce_bucket_size=5e8",
                                            "engine.ds_config.steps_per_print=100",
                                            "engine.ds_config.wall_clock_breakdown=true"]), 1)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert type(ds["zero_optimization"]["reduce_bucket_size"]) is int
    assert (ds["steps_per_print"], ds["wall_clock_breakdown"]) == (100, True)
    lax = build_ds_config(load_config(None, ["engine.ds_config.wall_clock_breakdown=1",  # DeepSpeed's reading
                                             "engine.ds_config.zero_allow_untested_optimizer=null"]), 1)
    assert lax["wall_clock_breakdown"] is True and lax["zero_allow_untested_optimizer"] is None


def test_resolve_derives_the_batch_once_without_changing_the_config():
    from vitscale.config.resolve import resolve
    from vitscale.distributed.engine import build_ds_config

    cfg = load_config(ROOT / "configs/demo.yaml", ["data.global_batch_size=96", "train.grad_accum=2",
                                                   "optim.lr=null", "optim.blr=0.004"])
    r = resolve(cfg, 3)
    assert (r.cfg.data.batch_size, r.global_batch, r.peak_lr) == (16, 96, 0.004 * 96 / 256)
    assert cfg.data.batch_size == 64  # the caller's config is left alone
    ds = build_ds_config(r.cfg, 3)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (16, 2, 96)
    plain = resolve(load_config(ROOT / "configs/demo.yaml"), 2)  # no global batch: batch x accum x world
    assert (plain.cfg.data.batch_size, plain.global_batch, plain.peak_lr) == (64, 128, 2e-3)
    with pytest.raises(ConfigError, match=r"not divisible by 5 process\(es\) x train.grad_accum=2 = 10"):
        resolve(cfg, 5)


def test_epochs_become_steps_from_the_sample_count_once():
    from vitscale.config.resolve import resolve

    cfg = load_config(ROOT / "configs/demo.yaml", ["train.steps=null", "train.epochs=2.5", "optim.warmup_steps=null",
                                                   "optim.warmup_epochs=0.5", "data.global_batch_size=128"])
    r = resolve(cfg, 2, train_samples=1000)
    # ceil(2.5 x 1000 / 128) = ceil(19.53) = 20; ceil(0.5 x 1000 / 128) = ceil(3.9) = 4
    assert (r.cfg.train.steps, r.cfg.optim.warmup_steps) == (20, 4)
    assert r.cfg.train.epochs is None and r.cfg.optim.warmup_epochs is None  # the saved config reloads as it ran
    assert "train.steps=20 (train.epochs=2.5 x 1000 samples / global batch 128)" in r.length_note
    assert cfg.train.steps is None and cfg.train.epochs == 2.5  # the caller's config is left alone
    resaved = load_config(None, [f"{k}={v}" for k, v in (("train.steps", 20), ("optim.warmup_steps", 4))])
    assert resolve(resaved, 2).cfg.train.steps == 20
    # exact arithmetic: 0.1 epoch of 1000 samples at 100 per step is 1 step (float: 1.0000000000000002 -> 2)
    tenth = load_config(None, ["train.epochs=0.1", "data.global_batch_size=100"])
    assert resolve(tenth, 1, train_samples=1000).cfg.train.steps == 1
    assert resolve(tenth, 1, need_length=False).cfg.train.steps is None  # plan/bench: no data read
    plain = resolve(load_config(None), 1)  # neither given: the defaults
    assert (plain.cfg.train.steps, plain.cfg.optim.warmup_steps, plain.length_note) == (1000, 100, "")


@pytest.mark.parametrize("overrides, words", [
    (["train.epochs=90"], ["train.steps=300", "train.epochs=90", "both set"]),  # demo.yaml gives train.steps
    (["optim.warmup_epochs=5"], ["optim.warmup_steps=30", "optim.warmup_epochs=5", "both set"]),
    (["train.steps=null", "train.epochs=0"], ["train.epochs", "> 0"]),
    (["optim.warmup_steps=null", "optim.warmup_epochs=-1"], ["optim.warmup_epochs", ">= 0"]),
])
def test_bad_length_keys_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", overrides)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_epochs_of_data_without_a_sample_count_is_one_line():
    from vitscale.config.resolve import resolve

    cfg = load_config(None, ["train.epochs=3", "data.train_shards=s3://bucket/train-{0000..0099}.tar"])
    with pytest.raises(ConfigError) as e:
        resolve(cfg, 1, train_samples=None)
    msg = str(e.value)
    assert "\n" not in msg and "train.epochs" in msg and "s3://bucket/train-{0000..0099}.tar" in msg, msg


def test_old_checkpoints_without_the_new_model_keys_still_resume(tmp_path):
    from vitscale.config.load import config_to_dict
    from vitscale.train import check_resumable

    cfg = load_config(ROOT / "configs/demo.yaml")
    saved = config_to_dict(cfg)
    for key in ("pos_embed", "class_token", "mlp_ratio", "qkv_bias", "init_values", "fc_norm", "qk_norm", "reg_tokens"):
        del saved["model"][key]  # written before these keys existed: their defaults were the only behaviour
    check_resumable(saved, cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"model.pos_embed=None there, 'sincos' here"):
        check_resumable(saved, load_config(ROOT / "configs/demo.yaml", ["model.pos_embed=sincos"]), tmp_path)


DEMO_MAE = "configs/demo_mae.yaml"


@pytest.mark.parametrize("config, override, words", [
    ("configs/demo.yaml", "model.patch_size=0", ["model.patch_size", ">= 1"]),  # was ZeroDivisionError
    ("configs/demo.yaml", "model.patch_size=-4", ["model.patch_size", ">= 1"]),
    ("configs/demo.yaml", "model.num_heads=0", ["model.num_heads", ">= 1"]),
    ("configs/demo.yaml", "model.embed_dim=0", ["model.embed_dim", ">= 1"]),
    ("configs/demo.yaml", "model.depth=0", ["model.depth", ">= 1"]),  # was a ViT without blocks
    (DEMO_MAE, "model.decoder_embed_dim=0", ["model.decoder_embed_dim", ">= 1"]),
    (DEMO_MAE, "model.decoder_depth=0", ["model.decoder_depth", ">= 1"]),
    (DEMO_MAE, "model.decoder_num_heads=0", ["model.decoder_num_heads", ">= 1"]),
    ("configs/demo.yaml", "train.steps=0", ["train.steps", ">= 1"]),  # was 1000 steps
    ("configs/demo.yaml", "data.global_batch_size=0", ["data.global_batch_size", ">= 1"]),
    ("configs/demo.yaml", "optim.betas=[0.9]", ["optim.betas", "two numbers in [0, 1)"]),
    ("configs/demo.yaml", "optim.betas=[a,b]", ["optim.betas", "two numbers in [0, 1)"]),
    ("configs/demo.yaml", "optim.betas=[0.9,1.5]", ["optim.betas", "two numbers in [0, 1)"]),
    ("configs/demo.yaml", "objective.label_smoothing=2", ["objective.label_smoothing", "[0, 1)"]),
    ("configs/demo.yaml", "data.eval_crop_pct=0", ["data.eval_crop_pct", "(0, 1]"]),
    ("configs/demo.yaml", "data.interpolation=nearest", ["data.interpolation", "bicubic"]),
    ("configs/demo.yaml", "optim.min_lr=-1", ["optim.min_lr", ">= 0"]),  # was an LR that rose to -0.75
    ("configs/demo.yaml", "engine.timeout_s=-5", ["engine.timeout_s", "> 0"]),  # was a C++ stack dump
    ("configs/demo.yaml", "engine.timeout_s=0", ["engine.timeout_s", "> 0"]),
    ("configs/demo.yaml", "engine.preempt_grace_s=-1", ["engine.preempt_grace_s", ">= 0"]),
    ("configs/demo.yaml", "data.shards_in_flight=0", ["data.shards_in_flight", ">= 1"]),  # was config.yaml written
    ("configs/demo.yaml", "data.shuffle_buffer=-1", ["data.shuffle_buffer", ">= 0"]),
    ("configs/demo.yaml", "data.max_bad_fraction=2", ["data.max_bad_fraction", "[0, 1]"]),
    ("configs/demo.yaml", "data.max_bad_fraction=.nan", ["data.max_bad_fraction", "[0, 1]"]),
    ("configs/demo.yaml", "train.keep_last=-1", ["train.keep_last", ">= 0"]),
    ("configs/demo.yaml", "logging.peak_tflops=0", ["logging.peak_tflops", "> 0"]),
    ("configs/demo.yaml", "model.head_init_std=-1", ["model.head_init_std", ">= 0"]),
    (DEMO_MAE, "objective.mask_ratio=0", ["objective.mask_ratio", "(0, 1)", "mae"]),
    ("configs/demo.yaml", "optim.lr=-0.001", ["optim.lr", ">= 0"]),
    ("configs/demo.yaml", "optim.lr=.nan", ["optim.lr", "finite"]),
    ("configs/demo.yaml", "optim.lr=.inf", ["optim.lr", "finite"]),
    ("configs/demo.yaml", "optim.blr=-1e-3", ["optim.blr", ">= 0"]),
    ("configs/demo.yaml", "data.crop_min_scale=2", ["data.crop_min_scale", "(0, 1]"]),
    ("configs/demo.yaml", "data.mixup_prob=5", ["data.mixup_prob", "[0, 1]"]),
    ("configs/demo.yaml", "data.random_erasing=2", ["data.random_erasing", "[0, 1]"]),
    ("configs/demo.yaml", "data.mixup=-1", ["data.mixup", ">= 0"]),
    ("configs/demo.yaml", "optim.momentum=5", ["optim.momentum", "[0, 1)"]),
    ("configs/demo.yaml", "optim.grad_clip=-1", ["optim.grad_clip", ">= 0"]),
    ("configs/demo.yaml", "optim.layer_decay=0", ["optim.layer_decay", "(0, 1]"]),
    ("configs/demo.yaml", "optim.weight_decay=-1", ["optim.weight_decay", ">= 0"]),
    ("configs/demo.yaml", "run.name=", ["run.name", "non-empty"]),
    ("configs/demo.yaml", "run.name=..", ["run.name", "'..'"]),
    ("configs/demo.yaml", "run.name=a/b", ["run.name", "'/'"]),
    ("configs/demo.yaml", "train.eval_every=-1", ["train.eval_every", ">= 0"]),
    ("configs/demo.yaml", "data.num_classes=-1", ["data.num_classes", ">= 0"]),  # was "not in the shard manifest"
    ("configs/demo.yaml", "optim.schedule=step", ["optim.schedule", "cosine, linear", "'step'"]),
    (DEMO_MAE, "logging.image_count=0", ["logging.image_count", ">= 1"]),
])
def test_out_of_range_values_are_one_line_naming_the_key(config, override, words):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / config, [override])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_range_edges_and_nulls_keep_their_meaning():
    from vitscale.config.resolve import resolve

    cfg = load_config(ROOT / "configs/demo.yaml", [
        "train.steps=null", "data.global_batch_size=null", "model.patch_size=null", "model.depth=null",
        "optim.lr=0", "optim.grad_clip=0", "optim.momentum=0", "optim.layer_decay=1", "data.eval_crop_pct=1",
        "data.mixup_prob=0", "train.eval_every=0", "run.name=a..b", "objective.mask_ratio=0", "train.keep_last=0",
        "data.max_bad_fraction=0", "data.shuffle_buffer=0", "engine.preempt_grace_s=0", "model.head_init_std=0",
        "logging.peak_tflops=null", "model.head_init_std=null"])
    assert resolve(cfg, 1).cfg.train.steps == 1000  # null is still the default length
    load_config(ROOT / DEMO_MAE, ["objective.mask_ratio=0.9", "optim.lr=null", "optim.blr=1e-4"])


def test_config_file_not_utf8_or_unreadable_is_one_line(tmp_path, monkeypatch):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xfc\x00 not text")
    with pytest.raises(ConfigError, match=r"^config file .*bin.yaml is not UTF-8 text \(byte 0xfc at position 0\)$"):
        load_config(binary)
    readable = tmp_path / "c.yaml"
    readable.write_text("train:\n  steps: 3\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # mode 000 does not stop root
    with pytest.raises(ConfigError, match=r"^config file .*c.yaml cannot be read: Permission denied$"):
        load_config(readable)


def test_bad_value_through_the_cli_is_one_line_and_writes_nothing(tmp_path):
    from conftest import DEMO, run_cli

    r = run_cli(["train", "--config", DEMO, f"run.dir={tmp_path / 'runs'}", "run.name=bad",
                 f"data.cache_dir={tmp_path / 'cache'}", "model.patch_size=0"], cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vitscale: error: ") and "model.patch_size" in last, r.stderr
    assert not (tmp_path / "runs").exists() and list(tmp_path.iterdir()) == []  # no runs/bad/config.yaml


def test_a_key_given_twice_is_refused_and_a_nested_ds_config_override_keeps_its_neighbours(tmp_path):
    """A second train: section further down a file replaced the first one whole; an override of one DeepSpeed key
    dropped the file's other keys of that section; "5e8" (YAML 1.1: a string) reached DeepSpeed as text."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  steps: 5\nmodel:\n  name: vit_micro_patch4\ntrain:\n  ckpt_every: 7\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'train' is given twice in one mapping \(lines 1 and 5\)"):
        load_config(dup)
    (tmp_path / "merge.yaml").write_text("run:\n  name: &n x\ntrain: &t {steps: 5, ckpt_every: 3}\n")
    assert load_config(tmp_path / "merge.yaml").train.steps == 5  # anchors still work
    ds = tmp_path / "ds.yaml"
    ds.write_text("engine:\n  ds_config:\n    zero_optimization: {allgather_bucket_size: 2e8, reduce_scatter: false}\n")
    cfg = load_config(ds, ["engine.ds_config.zero_optimization.reduce_bucket_size=5e8"])
    assert cfg.engine.ds_config == {"zero_optimization": {"allgather_bucket_size": 200_000_000, "reduce_scatter": False,
                                                          "reduce_bucket_size": 500_000_000}}


def test_a_floor_above_the_peak_lr_is_refused_once_the_peak_is_known():
    """optim.min_lr above the peak (optim.lr, or blr x global batch / 256) made the decay raise the LR."""
    from vitscale.config.resolve import resolve

    with pytest.raises(ConfigError, match=r"optim.min_lr=0.01 is above the peak LR 0.002"):
        resolve(load_config(ROOT / "configs/demo.yaml", ["optim.min_lr=0.01", "optim.lr=0.002"]), 1)
    assert resolve(load_config(ROOT / "configs/demo.yaml", ["optim.min_lr=0", "optim.lr=0"]), 1).peak_lr == 0
