"""One process (DeepSpeed's CPU accelerator, gloo): the same tiny model trained STEPS steps through the engine,
eagerly and with train.compile, at each case below; writes {case: {"eager": [...], "compiled": [...],
"keys_equal": bool, "compiled_at_end": bool}} to the JSON path given as the first argument (a second: comma-separated cases).

Cases: ViT at ZeRO 0-3; ViT at ZeRO-3 with gradient checkpointing of all blocks; MAE at ZeRO-2 with the first
block of 2+1 checkpointed (selective)."""
from __future__ import annotations

import json
import sys

import torch

from vitscale.config.load import load_config
from vitscale.distributed import engine as eng
from vitscale.distributed.compile import is_compiled
from vitscale.distributed.env import detect_env
from vitscale.objectives import build_model
from vitscale.optim import param_groups

STEPS, BATCH = 20, 8
TINY = ["model.name=vit_micro_patch8", "model.img_size=32", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
        "train.precision=fp32", f"data.batch_size={BATCH}"]
CASES = {f"vit_zero{s}": [f"engine.zero_stage={s}"] for s in (0, 1, 2, 3)}
CASES["vit_zero3_ckpt"] = ["engine.zero_stage=3", "model.grad_checkpointing=true"]
CASES["mae_zero2_ckpt1"] = ["engine.zero_stage=2", "objective.name=mae", "model.grad_checkpointing=1"]


def sizes_of(cfg):
    """As the trainer does: ZeRO-3's settings sized from the model (a meta build)."""
    with torch.device("meta"):
        return eng.ModelSizes.of(build_model(cfg, 10))


def train(overrides: list[str]) -> tuple[list[float], list[str], bool]:
    cfg = load_config(None, [*TINY, *overrides])
    ds_config = eng.build_ds_config(cfg, torch.distributed.get_world_size(), sizes=sizes_of(cfg))
    torch.manual_seed(0)
    with eng.model_init_context(cfg, ds_config):
        model = build_model(cfg, 10)
    engine = eng.initialize(model, param_groups(model, 0.05, 1.0), cfg, ds_config)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    engine.train()
    losses = []
    for step in range(STEPS):
        engine.set_lr(1e-3)
        torch.manual_seed(100 + step)  # MAE masks: the same in both runs
        if cfg.objective.name == "mae":
            loss, _, _ = engine(images, mask_ratio=0.75)
        else:
            loss = torch.nn.functional.cross_entropy(engine(images), labels)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    keys, compiled = list(engine.module.state_dict()), is_compiled(engine.module)
    engine.close()
    return losses, keys, compiled


def main() -> None:
    eng.setup(detect_env())
    torch.set_num_threads(1)
    out = {}
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    only = args[1].split(",") if len(args) > 1 else list(CASES)  # optional: some cases only
    for name, overrides in ((n, CASES[n]) for n in only):
        eager, keys_e, _ = train(overrides)
        compiled, keys_c, at_end = train([*overrides, "train.compile=true"])
        out[name] = {"eager": eager, "compiled": compiled, "keys_equal": keys_e == keys_c, "compiled_at_end": at_end}
        print(name, max(abs(a - b) for a, b in zip(eager, compiled)), flush=True)
    if torch.distributed.get_rank() != 0:
        return
    with open(args[0], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
