"""What a cell computes, recorded in its ``sweep_cell.json`` before it runs: a sweep relaunched into the same
``--out`` keeps (or resumes) a cell only when this command would compute the same thing.

The record is the cell's resolved training config (the base file with the shared overrides, the axis values and the
seed applied: a changed base file, a changed shared override or a newer default all show) plus the evaluation
settings, as flat ``key: value`` pairs so a refusal can name each differing key. A mismatch is refused, not
retrained under another name: the folder holds results (and checkpoints a resume would start from) of other
settings, and the user decides whether to keep them (a new ``--out``) or not (delete the cell's folder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from vitscale.config.load import check_nesting, check_size  # the limits every config file is read within
from vitscale.config.load import config_to_dict, load_config
from vitscale.config.schema import Config
from vitscale.sweep.grid import Cell, SweepError
from vitscale.sweep.runner import FINETUNE, SweepPlan, cell_dir, load_result, note_no_record

# Where the run lives and how it shows its progress, not what it computes (--out may be spelled another way on a
# relaunch, and wandb may be switched off for it).
NOT_SETTINGS = ("run.dir", "run.name", "train.progress", "logging.wandb.mode", "logging.wandb.project",
                "logging.wandb.entity",
                # how the cell runs, not what it computes (fewer workers after an OOM kill must not refuse it)
                "data.num_workers", "train.ckpt_every", "train.keep_last", "train.log_every", "engine.timeout_s")
# What a run's config.yaml holds resolved where the record holds it as written (train.epochs -> train.steps, a
# global batch -> data.batch_size): a folder from before records is compared on a derived key only where this
# command sets it itself (key -> the key that, when set, derives it; None: always derived or dropped).
RESOLVED_IN_CONFIG_YAML = {"train.steps": "train.epochs", "optim.warmup_steps": "optim.warmup_epochs",
                           "data.batch_size": "data.global_batch_size", "train.epochs": None,
                           "optim.warmup_epochs": None, "data.global_batch_size": None}
FINETUNE_NOT_SETTINGS = (*NOT_SETTINGS, "run.seed", "model.init")  # set per cell from the cell's own
SHOWN_DIFFERENCES = 4


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (an empty mapping stays a value: ``engine.ds_config: {}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(settings: dict) -> dict:
    """As JSON gives it back (tuples become lists), so a recorded and a fresh record compare equal."""
    return json.loads(json.dumps(settings))


def finetune_settings(plan: SweepPlan) -> dict[str, Any]:
    """The fine-tuning config's settings shared by every cell (``finetune:``-prefixed keys); {} without
    ``--eval finetune``. The config loads: check_finetune has loaded it before."""
    if FINETUNE not in plan.evals:
        return {}
    flat = flatten(config_to_dict(load_config(plan.finetune_config, [*plan.finetune_overrides, "model.init="])))
    return {f"finetune:{k}": v for k, v in flat.items() if k not in FINETUNE_NOT_SETTINGS}


def cell_settings(plan: SweepPlan, cfg: Config, finetune: dict[str, Any]) -> dict[str, Any]:
    """The record of one cell: ``cfg`` is its resolved training config, ``finetune`` from :func:`finetune_settings`."""
    flat = {k: v for k, v in flatten(config_to_dict(cfg)).items() if k not in NOT_SETTINGS}
    flat.update({"--eval": ",".join(plan.evals), "--eval-data": plan.eval_data,
                 "--eval-val-data": plan.eval_val_data, **finetune})
    return _plain(flat)


def recorded_settings(plan: SweepPlan, cell: Cell, new: dict[str, Any]) -> Optional[dict[str, Any]]:
    """What the cell's folder was run with: its record, else (a folder of a vitscale before records) the training
    settings in the run's own config.yaml, less what it holds resolved and ``new`` (this command's) does not set;
    None when the folder has neither (nothing of it ran)."""
    done = load_result(plan, cell)
    if done is not None and isinstance(done.get("settings"), dict):
        return done["settings"]
    path = cell_dir(plan, cell) / "config.yaml"
    try:
        flat = _config_yaml(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as e:  # ConfigError is a ValueError
        return note_no_record(path, "nested too deeply" if isinstance(e, RecursionError) else str(e))
    if flat is None:
        return note_no_record(path, "not a mapping of sections")
    derived = {k for k, source in RESOLVED_IN_CONFIG_YAML.items()
               if source is None or new.get(k) is None or new.get(source) is not None}
    return _plain({k: v for k, v in flat.items() if k not in NOT_SETTINGS and k not in derived})


def _config_yaml(path: Path) -> Optional[dict[str, Any]]:
    """A run's config.yaml flattened, or None when it is not a mapping; read within the limits a config file has
    (a cell's folder is anyone's: an alias bomb flattened for minutes, "[[[..." deep cost PyYAML seconds)."""
    text = path.read_bytes().decode("utf-8")
    check_nesting(text, "it")  # the message names the file already
    tree = yaml.safe_load(text)
    check_size(tree, "it")
    return flatten(tree) if isinstance(tree, dict) else None


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key old -> new`` for each setting both records have that differs. A key only one has is a key one vitscale
    version has and the other lacks (nobody could set it then), or an eval key a config.yaml lacks: comparing it
    would refuse every sweep begun before an upgrade that adds a config key."""
    return [f"{k} {_shown(old[k])} -> {_shown(v)}" for k, v in new.items() if k in old and old[k] != v]


def _shown(value: Any) -> str:
    return value if isinstance(value, str) and value else json.dumps(value)


def check_recorded(plan: SweepPlan, cells: Sequence[Cell]) -> None:
    """Refuse, before anything runs, a relaunch whose cells' folders hold runs of other settings: their results
    would be reported as this command's, and an unfinished one would resume from their checkpoints."""
    stale: list[tuple[Path, list[str]]] = []
    for cell in cells:
        new = plan.settings.get(cell.name)
        old = recorded_settings(plan, cell, new) if new is not None else None
        if old is not None and (diffs := differences(old, new)):
            stale.append((cell_dir(plan, cell), diffs))
    if not stale:
        return
    folder, diffs = stale[0]
    shown = ", ".join(diffs[:SHOWN_DIFFERENCES]) + (f" and {len(diffs) - SHOWN_DIFFERENCES} more"
                                                    if len(diffs) > SHOWN_DIFFERENCES else "")
    others = f" (and {len(stale) - 1} more cells of {plan.cells_dir})" if len(stale) > 1 else ""
    raise SweepError(f"{folder}{others} was run with other settings ({shown}): its results would be reported as "
                     f"this command's; use a new --out, or delete the folder to run it again with these settings")
