"""Run under `deepspeed --num_gpus W` (CPU, gloo): train a tiny model a few steps at each ZeRO stage on one fixed
global batch split over the ranks, and write what the test compares across world sizes to --out (rank 0).

Modes (several may run in one launch, in the order given):
  losses     per-stage ViT losses; at stage 3 also with gradient checkpointing (ViT, and MAE with and without
             it) and whether zero.Init built exactly the weights an unsharded build gives
  save       train, save a checkpoint per stage 1-3 under --save-to, dump every parameter's full fp32 value, AdamW
             moments (gathered) and group hyperparameters to --out, then train 2 more steps (their losses too)
  load       load each checkpoint under --load-from (one per stage 1-3) at every stage 1-3 at this world size
             (universal conversion when the world size or stage differs), dump the same; several --load-from
  memory     build a ViT with and without zero.Init, report the peak resident memory each build added
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from vitscale.config.load import load_config
from vitscale.distributed import engine as eng
from vitscale.distributed.checkpoint import CheckpointManager
from vitscale.distributed.env import detect_env
from vitscale.objectives import build_model
from vitscale.optim import param_groups

GLOBAL_BATCH, STEPS = 8, 3
TINY = ["model.name=vit_micro_patch8", "model.img_size=32", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "train.precision=fp32", "optim.grad_clip=1.0", "optim.weight_decay=0.05"]


def make_config(stage: int, world: int, *extra: str):
    return load_config(None, [*TINY, f"engine.zero_stage={stage}", f"data.batch_size={GLOBAL_BATCH // world}",
                              *extra])


def build_engine(cfg, num_classes: int = 10, load_universal: bool = False):
    ds_config = eng.build_ds_config(cfg, eng_world(), load_universal=load_universal)
    torch.manual_seed(cfg.run.seed)
    with eng.model_init_context(cfg, ds_config):
        model = build_model(cfg, num_classes)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    return eng.initialize(model, groups, cfg, ds_config)


def eng_world() -> int:
    return torch.distributed.get_world_size()


def batch_for_rank(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
    per = GLOBAL_BATCH // world
    return images[rank * per:(rank + 1) * per], labels[rank * per:(rank + 1) * per]


def train_steps(engine, cfg, rank: int, world: int, steps: int = STEPS, first: int = 0,
                norms: Optional[list] = None) -> list[float]:
    """The losses of ``steps`` steps (and into ``norms``, the gradient norm each step reports)."""
    images, labels = batch_for_rank(rank, world)
    losses = []
    engine.train()
    for step in range(first, first + steps):
        engine.set_lr(1e-3)
        torch.manual_seed(100 + step)  # MAE masks: the same on every run at this world size
        if cfg.objective.name == "mae":
            loss, _, _ = engine(images.to(engine.dtype), mask_ratio=0.75)
        else:
            loss = torch.nn.functional.cross_entropy(engine(images.to(engine.dtype)).float(), labels)
        engine.backward(loss)
        engine.step()
        if norms is not None:
            norms.append(engine.grad_norm())
        losses.append(eng.all_reduce_sum([float(loss)])[0] / world)
    return losses


def init_matches_unsharded(engine, cfg) -> float:
    """Max |zero.Init weights - unsharded weights (rounded to the engine's dtype)| for the same seed (0.0 means
    identical)."""
    full = engine.full_state(moments=False)
    torch.manual_seed(cfg.run.seed)
    reference = build_model(cfg, 10).state_dict()
    return max(float((full[name]["param"] - reference[name].to(engine.dtype).float()).abs().max()) for name in full)


def mode_losses(rank: int, world: int) -> dict:
    out: dict = {}
    for stage in (0, 1, 2, 3):
        cfg = make_config(stage, world)
        engine = build_engine(cfg)
        if stage == 3:
            out["zero3_init_max_diff"] = init_matches_unsharded(engine, cfg)
        out[f"vit_stage{stage}_grad_norm"] = norms = []
        out[f"vit_stage{stage}"] = train_steps(engine, cfg, rank, world, norms=norms)
    cfg = make_config(3, world, "train.precision=bf16")  # zero.Init builds the layers in bf16
    out["zero3_bf16_init_max_diff"] = init_matches_unsharded(build_engine(cfg), cfg)
    for stage in (0, 1):  # bf16: ZeRO-0 trains with DeepSpeed's unfused optimizer, ZeRO-1 with its ZeRO optimizer
        cfg = make_config(stage, world, "train.precision=bf16")
        out[f"vit_bf16_stage{stage}_grad_norm"] = norms = []
        out[f"vit_bf16_stage{stage}"] = train_steps(build_engine(cfg), cfg, rank, world, norms=norms)
    cfg = make_config(3, world, "model.grad_checkpointing=true")
    out["vit_stage3_ckpt"] = train_steps(build_engine(cfg), cfg, rank, world)
    for ckpt in ("false", "true"):
        cfg = make_config(3, world, "objective.name=mae", f"model.grad_checkpointing={ckpt}")
        out[f"mae_stage3_ckpt_{ckpt}"] = train_steps(build_engine(cfg), cfg, rank, world)
    return out


def _dump(engine) -> dict:
    return {name: {k: v.tolist() for k, v in d.items()} for name, d in engine.full_state().items()}


SAVED_STAGES = (1, 2, 3)
EXTRA_STEPS = 2  # after a save (the uninterrupted run) and after a load (the resumed one)


def _groups(engine) -> list[dict]:
    """Each param group's hyperparameters (what a resume must keep, besides weights and moments)."""
    return [{k: g[k] for k in ("weight_decay", "lr_scale", "betas", "eps")} for g in engine.ds.optimizer.param_groups]


def _after(engine, cfg, rank: int, world: int) -> dict:
    """Everything a resume must restore, then the losses of two more steps: the first is computed from the
    weights alone, the second after an update that uses the AdamW moments, step count and group hyperparameters."""
    out = {"state": _dump(engine), "groups": _groups(engine)}
    out["losses"] = train_steps(engine, cfg, rank, world, steps=EXTRA_STEPS, first=STEPS)
    return out


def mode_save(rank: int, world: int, ckpt: Path) -> dict:
    out = {}
    for stage in SAVED_STAGES:
        cfg = make_config(stage, world)
        engine = build_engine(cfg)
        head = train_steps(engine, cfg, rank, world)
        manager = CheckpointManager(ckpt / f"stage{stage}", rank)
        manager.save(engine, STEPS, {"step": STEPS, "world_size": world,
                                     "config": {"engine": {"zero_stage": stage}}}, {"rng": {}})
        out[f"stage{stage}"] = {**_after(engine, cfg, rank, world), "head": head}  # head: steps 1-3
    return out


def mode_load(rank: int, world: int, ckpt: Path) -> dict:
    """Every checkpoint under CKPT (one per ZeRO stage 1-3) resumed at every stage 1-3 on this world size."""
    out = {}
    for saved in SAVED_STAGES:
        for stage in (1, 2, 3):
            cfg = make_config(stage, world)
            manager = CheckpointManager(ckpt / f"stage{saved}", rank)
            path = manager.find("auto")
            universal = manager.prepare(path, world, stage)  # converts once if the layout changed
            engine = build_engine(cfg, load_universal=universal)
            manager.load(engine, path, universal=universal)
            out[f"{saved}to{stage}"] = {**_after(engine, cfg, rank, world), "universal": universal}
            engine.close()
    return out


def mode_memory(rank: int, world: int) -> dict:
    """Tensor memory a ViT-S/16 (fp32, 64 px) takes to build with zero.Init (ZeRO-3) and without, counted as live
    tensor storage bytes (vitscale.bench.memory.LiveTensorMemory: what max_memory_allocated counts on a GPU)."""
    from vitscale.bench.memory import LiveTensorMemory

    cfg = load_config(None, ["model.name=vit_small_patch16", "model.img_size=64", "train.precision=fp32",
                             "engine.zero_stage=3"])
    ds_config = eng.build_ds_config(cfg, world)
    with LiveTensorMemory("cpu") as sharded_mem:
        with eng.model_init_context(cfg, ds_config):
            sharded = build_model(cfg, 10)
        sharded_held = sharded_mem.live_bytes()
    local = sum(p.ds_tensor.numel() for p in sharded.parameters()) * 4
    total = sum(p.ds_numel for p in sharded.parameters()) * 4
    with LiveTensorMemory("cpu") as full_mem:
        full = build_model(cfg, 10)
        full_held = full_mem.live_bytes()
    del full, sharded
    mb = 2**20
    return {"rank": rank, "param_mb_total": total / mb, "param_mb_local": local / mb,
            "param_mb_local_sum": eng.all_reduce_sum([local / mb])[0], "zero_init_held_mb": sharded_held / mb,
            "zero_init_peak_mb": sharded_mem.peak / mb, "unsharded_held_mb": full_held / mb,
            "unsharded_peak_mb": full_mem.peak / mb}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int, default=None)
    p.add_argument("modes", nargs="+", choices=["losses", "save", "load", "memory"])
    p.add_argument("--out", required=True, help="JSON file (rank 0); memory: one file per rank, OUT.rankN")
    p.add_argument("--save-to", default=None)
    p.add_argument("--load-from", action="append", default=[], help="NAME=DIR (repeatable)")
    args = p.parse_args()
    env = detect_env(local_rank_arg=args.local_rank)
    eng.setup(env)
    rank, world = env.rank, env.world_size
    result: dict = {"world_size": world}
    for mode in args.modes:
        if mode == "losses":
            result["losses"] = mode_losses(rank, world)
        elif mode == "save":
            result["save"] = mode_save(rank, world, Path(args.save_to))
        elif mode == "load":
            result["load"] = {name: mode_load(rank, world, Path(d))
                              for name, d in (x.split("=", 1) for x in args.load_from)}
        else:  # memory is per process: every rank reports
            Path(f"{args.out}.rank{rank}").write_text(json.dumps(mode_memory(rank, world)))
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    eng.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
