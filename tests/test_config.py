"""Config: one schema, YAML + key=value overrides, one-line errors that name the key (through the CLI, with
nothing written: tests/faults/test_bad_config.py)."""
from pathlib import Path

import pytest

from vitscale.config import ConfigError, load_config
from vitscale.config.load import all_keys

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

    from vitscale.trainer import build_model

    cfg = load_config(path)
    with torch.device("meta"):
        model = build_model(cfg, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert "vitscale train" in path.read_text() or "launch/" in path.read_text()  # header says how to launch


def test_mae_decoder_keys_reach_the_model():
    import torch

    from vitscale.trainer import build_model

    cfg = load_config(ROOT / "configs/demo_mae.yaml", ["model.decoder_embed_dim=64", "model.decoder_depth=1",
                                                       "model.decoder_num_heads=2"])
    with torch.device("meta"):
        m = build_model(cfg, 0)
    assert (m.decoder_embed_dim, len(m.decoder_blocks), m.decoder_num_heads) == (64, 1, 2)
    with torch.device("meta"):
        default = build_model(load_config(ROOT / "configs/demo_mae.yaml"), 0)
    assert (default.decoder_embed_dim, len(default.decoder_blocks)) == (128, 2)  # the micro variant's decoder
