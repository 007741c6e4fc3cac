"""One universal checkpoint that every ZeRO stage (1-3) reads, whatever stage wrote it.

DeepSpeed's converter (``ds_to_universal``) writes a layout that only the *same family* of stage reads back
(DeepSpeed 0.19): a checkpoint written under ZeRO-3 and resumed under ZeRO-1/2, or the other way round, dies in
``assert len(self.ckpt_list) > 0`` or a KeyError, because the two families differ in three places:

- the model-states file DeepSpeed looks for: ZeRO-3 globs ``zero_pp_rank_0_mp_rank_*_model_states.pt``, ZeRO-0-2
  ``mp_rank_*_model_states.pt``; the converter copies only the source's names. In the universal path the file
  gives metadata alone (steps, world size; weights come from ``zero/``), so both names can be the same file;
- each parameter's ``fp32/exp_avg/exp_avg_sq.pt``: ZeRO-1/2 read ``{"param": tensor}``, the ZeRO-3 converter
  writes the bare tensor (ZeRO-3 reads either); and ZeRO-1/2 take the AdamW step from a ``step.pt`` beside them,
  which the ZeRO-3 converter does not write;
- ``zero/optimizer_state.pt``: ZeRO-1/2 need ``ds_version`` and per-group ``param_groups``, ZeRO-3 the step and
  hyperparameters under ``optimizer_state_dict``.

:func:`make_stage_independent` rewrites a converted directory so that it satisfies both. DeepSpeed's ZeRO-3
loader also copies the *first* param group's hyperparameters onto every group (weight decay 0 on every weight
after a resume); :func:`saved_param_groups` gives what the engine restores after loading.

This module reads and writes files only; the caller (engine.py) passes the safe loader of DeepSpeed's files.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
ZERO12_MODEL_STATES = "mp_rank_00_model_states.pt"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
Load = Callable[[Path], Any]  # reads one DeepSpeed file without running pickled code (engine's safe loader)
LAYOUT_VERSION = 2  # recorded in universal/COMPLETE: a directory converted before this layout is converted again


def make_stage_independent(folder: Path, load: Load) -> None:
    """Rewrite DeepSpeed's universal directory FOLDER in place so that ZeRO-1, 2 and 3 all resume from it."""
    folder = Path(folder)
    model_states = _link_model_states(folder, load)
    zero = folder / "zero"
    optim = load(zero / "optimizer_state.pt")
    step = _step_of(optim, zero, load)
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir()):
        for state in STATES:
            path = param_dir / f"{state}.pt"
            if not path.is_file():  # a frozen parameter (MAE's fixed sin-cos position table) has no moments
                continue
            value = load(path)
            if torch.is_tensor(value):  # ZeRO-3's converter: a bare tensor; ZeRO-1/2 read {"param": tensor}
                torch.save({"param": value}, path)
        trained = (param_dir / "exp_avg.pt").is_file()
        if step is not None and trained and not (param_dir / "step.pt").is_file():
            torch.save(step, param_dir / "step.pt")
    torch.save(_common_optimizer_state(optim, step, model_states), zero / "optimizer_state.pt")


def saved_param_groups(folder: Path, load: Load) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (weight decay, lr scale, betas, ...) as the universal FOLDER saved
    them, in group order, without their parameters."""
    optim = load(Path(folder) / "zero" / "optimizer_state.pt")
    return [{k: v for k, v in group.items() if k != "params"} for group in optim.get("param_groups", [])]


def restore_param_groups(optimizer: Any, folder: Path, load: Load) -> None:
    """After DeepSpeed loaded the universal FOLDER into OPTIMIZER (its ZeRO wrapper): each param group gets its own
    hyperparameters back (the ZeRO-3 loader gave every group group 0's: the no-decay group comes first, so weight
    decay 0 everywhere), and each AdamW state its own step tensor (the ZeRO-3 loader shares one, which torch's AdamW
    increments in place once per group: the count runs ahead and the bias correction is wrong)."""
    for group, hyper in zip(optimizer.param_groups, saved_param_groups(folder, load)):
        group.update(hyper)
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _link_model_states(folder: Path, load: Load) -> dict:
    """Both stage families' model-states names exist (hard links of one file: no extra space); returns its
    content."""
    names = [ZERO3_MODEL_STATES, ZERO12_MODEL_STATES]
    source = next((folder / n for n in names if (folder / n).is_file()), None)
    if source is None:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed model-states file ({' or '.join(names)})")
    for name in names:
        target = folder / name
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(source, target)
    return load(source)


def _step_of(optim: dict, zero: Path, load: Load) -> Any:
    """The AdamW step count: in ZeRO-3's optimizer_state.pt, or in any parameter's step.pt (ZeRO-1/2)."""
    state = optim.get("optimizer_state_dict", {}).get("state", {})
    if state and "step" in state.get(0, {}):
        return state[0]["step"]
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir()):
        if (param_dir / "step.pt").is_file():
            return load(param_dir / "step.pt")
    return None  # no optimizer step was taken before the save


def _common_optimizer_state(optim: dict, step: Any, model_states: dict) -> dict:
    """optimizer_state.pt readable by both families: the scalars both read, per-group ``param_groups`` (ZeRO-1/2)
    and ``optimizer_state_dict`` with the step and groups (ZeRO-3). The flat fp32 copy the ZeRO-3 converter
    leaves here (a whole partition, read by nobody) is dropped."""
    groups = optim.get("param_groups") or optim.get("optimizer_state_dict", {}).get("param_groups", [])
    groups = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    common = {k: v for k, v in optim.items() if k not in ("fp32_flat_groups", "optimizer_state_dict")}
    common["param_groups"] = groups
    common.setdefault("ds_version", model_states.get("ds_version"))
    common["optimizer_state_dict"] = {"state": {0: {"step": step}} if step is not None else {},
                                      "param_groups": groups}
    return common
