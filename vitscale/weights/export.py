"""``vitscale export RUN OUT``: a checkpoint's weights as one fp32 safetensors file with timm's keys (the folder
timm loads, ``--timm``, is :mod:`vitscale.weights.timm_export`)."""
from __future__ import annotations

import json
from pathlib import Path

from vitscale.distributed import engine as eng
from vitscale.distributed.checkpoint import read_trainer_state, resolve_checkpoint
from vitscale.distributed.ema import consolidated_ema
from vitscale.data.transforms import EVAL_VIEW_KEYS
from vitscale.objectives import saved_objective_class
from vitscale.weights.outfile import check_weights_path, save_weights


def export_weights(ckpt: Path, out: Path, full: bool = False, ema: bool = False) -> dict:
    """Consolidate sharded weights into one fp32 safetensors file with timm-compatible keys (``ema``: the model
    EMA's weights for every trained parameter, see :mod:`vitscale.distributed.ema`).

    The objective decides which part is written (``Objective.export_part``: an MAE its encoder alone, what
    downstream use needs, unless ``full``). The run's model and objective config travel in the file's metadata
    so eval/analyze can rebuild the model.
    """
    check_weights_path(Path(out))  # before minutes of consolidation at real size
    path = resolve_checkpoint(ckpt)
    state = read_trainer_state(path)
    sd = eng.consolidated_state_dict(path)
    if ema:
        sd.update({k: v.view(sd[k].shape) for k, v in consolidated_ema(path).items()})
    objective = state["config"]["objective"]
    sd, part = saved_objective_class(objective.get("name"), str(path)).export_part(sd, full)
    meta = {"vitscale_model": json.dumps(state["config"]["model"]), "vitscale_objective": objective["name"],
            "vitscale_objective_config": json.dumps(objective), "vitscale_part": part, "step": str(state["step"]),
            # how the run saw held-out images: eval and analyze see them the same way
            "vitscale_data_config": json.dumps({k: v for k, v in state["config"].get("data", {}).items()
                                                if k in EVAL_VIEW_KEYS})}
    save_weights(sd, Path(out), metadata=meta)
    return {"path": str(out), "tensors": len(sd), "params": sum(v.numel() for v in sd.values()), **meta}
