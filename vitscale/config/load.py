"""Build a validated `Config` from a YAML file plus `key=value` overrides.

Validation happens entirely in memory before anything is written, so a bad config never leaves a
half-created run directory behind. Every error is one line that names the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from vitscale.config.checks import check_ranges
from vitscale.config.schema import Config, choices
from vitscale.config.sources import parse_sources
from vitscale.config.yaml_text import exponent_numbers, load_unique
from vitscale.errors import ConfigError
from vitscale.objectives import objective_class, trust
from vitscale.optim.optimizers import check_optim  # optim.name's rules live with the optimizers


def key_types(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf key of the schema with its annotation, e.g. ``{"data.batch_size": int, ...}``."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(key_types(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = hints[f.name]
    return out


def all_keys() -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``data.batch_size``."""
    return list(key_types())


def _wants_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) is typing.Union and str in typing.get_args(tp))


def _closest(key: str) -> str:
    keys = all_keys()
    # Match on the full dotted key first, then on the last component (a key put in the wrong section).
    best = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not best:
        leaf = key.rsplit(".", 1)[-1]
        best = [k for k in keys if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(
            leaf, keys, n=1, cutoff=0.0)
    return best[0]


def _unknown(key: str) -> ConfigError:
    return ConfigError(f"unknown config key '{key}' (did you mean '{_closest(key)}'?)")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short (a message stays one line)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` (lossless conversions only) and against the key's choices."""
    value = _coerce_type(key, value, tp)
    allowed = choices().get(key)
    if allowed is not None and value is not None and value not in allowed:
        raise ConfigError(f"config key '{key}' got {_shown(value)}, expected one of {', '.join(map(str, allowed))}")
    return value


def _coerce_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce_type(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' got {_shown(value)} ({type(value).__name__}), expected {_type_name(tp)}")
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif tp in (list, dict) or typing.get_origin(tp) in (list, dict):
        base = typing.get_origin(tp) or tp
        ok = isinstance(value, base)
    if not ok:
        raise ConfigError(f"config key '{key}' got {_shown(value)} ({type(value).__name__}), expected {_type_name(tp)}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise _unknown(prefix + str(k))
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp, value, key = hints[name], data[name], prefix + name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' must be a section (mapping), got {_shown(value)}")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def build_section(cls: type, data: dict, prefix: str) -> Any:
    """One config section (``cls``, e.g. ModelConfig) from a mapping, each value checked against its type as a
    config file's is (one-line ConfigError naming ``prefix + key``)."""
    return _build(cls, data, prefix)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> dict:
    """`["train.steps=600", "run.name=x"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    types = key_types()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in types and not key.startswith("engine.ds_config."):
            raise _unknown(key)
        check_nesting(raw, f"override '{key}'")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"override '{key}': its value is not valid YAML: {first}") from None
        check_size(value, f"override '{key}'")
        if _wants_text(types.get(key)) and isinstance(value, (bool, int, float)):
            value = raw  # run.name=off or run.name=2024 are names, not YAML's false and 2024
        _set_dotted(tree, key, value)
    return tree


# A config is a few hundred values. YAML aliases can make a short file expand to billions (each "*a" is the whole
# anchored tree again, which later walks and copies would visit), so a config is refused past this many values.
MAX_CONFIG_VALUES = 100_000


MAX_FLOW_DEPTH = 64  # PyYAML takes minutes on "[[[[...]]]]" a few hundred deep; a config nests a few levels


def check_nesting(text: str, what: str) -> None:
    """YAML text nested deeper than MAX_FLOW_DEPTH brackets is refused before PyYAML parses it."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
    if deepest > MAX_FLOW_DEPTH:
        raise ConfigError(f"{what} nests [ or {{ {deepest} deep, more than {MAX_FLOW_DEPTH}")


def check_size(tree: Any, what: str) -> None:
    """Count the values of ``tree`` as later code would visit them (aliases expanded), stopping at the limit."""
    stack, seen = [tree], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(f"{what} holds more than {MAX_CONFIG_VALUES} values (YAML aliases expanding?)")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):  # engine.ds_config too: a nested key keeps its
            out[k] = _merge(out[k], v)                                # neighbours (as ds_config._deep_merge does)
        else:
            out[k] = v
    return out


def _read_text(path: str) -> str:
    """The config file's text; a file that is missing, unreadable or not UTF-8 is a one-line ConfigError naming it
    (the CLI prints ConfigErrors without a traceback, not every OSError)."""
    p = Path(path)
    try:
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = p.read_bytes()
    except OSError as e:  # e.g. PermissionError: mode 000, or a folder on the way that cannot be searched
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or type(e).__name__}") from None
    try:
        return raw.decode("utf-8")  # YAML is UTF-8 text, whatever the locale
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start})"
                          ) from None


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Config:
    """Read `path` (YAML), apply `key=value` overrides, validate, and return the Config."""
    data: dict = {}
    if path is not None:
        text = _read_text(path)
        check_nesting(text, f"config file {path}")
        try:
            data = load_unique(text) or {}
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
        check_size(data, f"config file {path}")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides))
    if isinstance(data.get("engine"), dict) and "ds_config" in data["engine"]:
        data["engine"]["ds_config"] = exponent_numbers(data["engine"]["ds_config"])
    cfg = _build(Config, data)
    check_consistency(cfg)
    return cfg


def check_consistency(cfg: Config) -> None:
    """Cross-key checks that a type system cannot express."""
    positive = {"data.batch_size": cfg.data.batch_size, "train.steps": cfg.train.steps,
                "train.grad_accum": cfg.train.grad_accum, "train.ckpt_every": cfg.train.ckpt_every,
                "train.log_every": cfg.train.log_every, "model.img_size": cfg.model.img_size,
                "train.rollback_after": cfg.train.rollback_after, "data.global_batch_size": cfg.data.global_batch_size}
    for key, value in positive.items():
        if value is not None and value < 1:  # null (train.steps, data.global_batch_size) means derived; 0 is not
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    check_ranges(cfg)  # single-key ranges, model sizes first: the divisibility check below divides by them
    _check_length(cfg)
    _check_ema(cfg)
    parse_sources(cfg.data.train_shards)  # a mix of sources: each one's keys, weights and names
    patch = cfg.model.patch_size
    if patch is not None and cfg.model.img_size % patch:
        raise ConfigError(f"model.img_size={cfg.model.img_size} is not divisible by model.patch_size={patch}")
    if not 0.0 <= cfg.objective.mask_ratio < 1.0:
        raise ConfigError(f"objective.mask_ratio must be in [0, 1), got {cfg.objective.mask_ratio}")
    if not 0.0 < cfg.train.rollback_lr_factor <= 1.0:
        raise ConfigError(f"train.rollback_lr_factor must be in (0, 1], got {cfg.train.rollback_lr_factor}")
    if cfg.train.max_rollbacks < 0:
        raise ConfigError(f"train.max_rollbacks must be >= 0, got {cfg.train.max_rollbacks}")
    if not isinstance(cfg.model.grad_checkpointing, bool) and cfg.model.grad_checkpointing < 0:
        raise ConfigError(f"model.grad_checkpointing must be true, false or a number of blocks >= 0, got "
                          f"{cfg.model.grad_checkpointing}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if cfg.engine.offload_params and cfg.engine.zero_stage != 3:
        raise ConfigError("engine.offload_params needs engine.zero_stage=3")
    if cfg.engine.offload_optimizer and cfg.engine.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer needs engine.zero_stage >= 1")
    if cfg.engine.nvme_path and not (cfg.engine.offload_optimizer or cfg.engine.offload_params):
        raise ConfigError("engine.nvme_path is set but nothing is offloaded: set engine.offload_optimizer "
                          "and/or engine.offload_params")
    _check_model(cfg)
    _check_ds_config(cfg.engine.ds_config)
    check_optim(cfg)
    objective_class(cfg.objective.name).check_config(cfg)  # the objective's own rules (and whether it exists)
    trust(cfg.objective.name)  # the user's own config names it: files (checkpoints, exports) may name it too


def _check_length(cfg: Config) -> None:
    """A length in steps or in epochs, never both (resolve.run_length derives the steps from the epochs)."""
    for steps_key, steps, epochs_key, epochs in (
            ("train.steps", cfg.train.steps, "train.epochs", cfg.train.epochs),
            ("optim.warmup_steps", cfg.optim.warmup_steps, "optim.warmup_epochs", cfg.optim.warmup_epochs)):
        if steps is not None and epochs is not None:
            raise ConfigError(f"{steps_key}={steps} and {epochs_key}={epochs} are both set: give the length in one "
                              f"of them ({steps_key}=null to count in epochs)")
    if cfg.train.epochs is not None and not cfg.train.epochs > 0:
        raise ConfigError(f"train.epochs must be > 0, got {cfg.train.epochs}")
    if cfg.optim.warmup_epochs is not None and not cfg.optim.warmup_epochs >= 0:
        raise ConfigError(f"optim.warmup_epochs must be >= 0, got {cfg.optim.warmup_epochs}")
    if cfg.optim.warmup_steps is not None and cfg.optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}")


def _check_ema(cfg: Config) -> None:
    t = cfg.train
    if not (t.ema_decay == 0 or 0 < t.ema_decay < 1):
        raise ConfigError(f"train.ema_decay must be 0 (off) or in (0, 1), got {t.ema_decay}")
    if t.ema_every < 1:
        raise ConfigError(f"train.ema_every must be >= 1, got {t.ema_every}")
    if t.best_metric == "val_top1_ema" and t.ema_decay == 0:
        raise ConfigError("train.best_metric=val_top1_ema needs an EMA: set train.ema_decay (e.g. 0.9999)")


def _check_model(cfg: Config) -> None:
    m = cfg.model
    for key in ("mlp_ratio", "decoder_mlp_ratio", "init_values"):
        value = getattr(m, key)
        if value is not None and value <= 0:
            raise ConfigError(f"model.{key} must be > 0 (or null), got {value}")
    if m.reg_tokens < 0:
        raise ConfigError(f"model.reg_tokens must be >= 0 (0 = no register tokens), got {m.reg_tokens}")
    for key in ("drop_path", "drop_rate", "attn_drop_rate", "proj_drop_rate"):
        if not 0.0 <= getattr(m, key) < 1.0:
            raise ConfigError(f"model.{key} must be in [0, 1), got {getattr(m, key)}")


# DeepSpeed settings that vitscale generates from a schema key: an engine.ds_config override of them would make
# DeepSpeed disagree with the rest of vitscale (the LR scaling, zero.Init, the data stream), so it is refused.
SHADOWED_DS_KEYS = {
    "train_micro_batch_size_per_gpu": "data.batch_size", "train_batch_size": "data.global_batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.offload_optimizer": "engine.offload_optimizer",
    "zero_optimization.offload_param": "engine.offload_params", "bf16.enabled": "train.precision",
    "bfloat16.enabled": "train.precision", "fp16.enabled": "train.precision", "gradient_clipping": "optim.grad_clip",
    "checkpoint.load_universal": "train.resume (a checkpoint from another world size is converted automatically)",
}


def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        path = f"{prefix}{k}"
        out += _leaf_paths(v, path + ".") if isinstance(v, dict) and v else [path]
    return out


def _check_ds_config(ds_config: dict) -> None:
    """Refuse overrides of DeepSpeed keys that a schema key sets (or of a section holding one)."""
    for path in _leaf_paths(ds_config):
        for ds_key, schema_key in SHADOWED_DS_KEYS.items():
            if path == ds_key or ds_key.startswith(path + "."):
                raise ConfigError(f"engine.ds_config.{path} would override what {schema_key} sets: "
                                  f"use {schema_key} instead")


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path, comment: str = "") -> None:
    """The config as YAML; ``comment`` (e.g. how train.steps was derived from train.epochs) heads it as # lines."""
    head = "".join(f"# {line}\n" for line in comment.split("; ")) if comment else ""
    path.write_text(head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
