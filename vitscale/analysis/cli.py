"""The ``analyze`` subcommand: ``add_parser(subparsers)`` registers it, ``run_analyze(args)`` runs it.

Imports sit inside the command functions (measured reason: startup): these modules load on every ``vitscale``
call, and on the shared 2-core test machine ``import vitscale.errors`` takes 0.6 s where ``import torch`` takes
8.6 s; ``vitscale --help`` or a bad argument answers at once, and each command imports what it runs.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    a = subparsers.add_parser(
        "analyze", help="attention rollout, mean attention distance, pos-embed similarity, filter PCA, MAE recon",
        description="Write interpretability figures (PNG) and their numbers (analysis.json) for a trained model.")
    a.add_argument("ckpt", help="model.safetensors from `vitscale export`, a checkpoint dir or a run dir")
    a.add_argument("images", nargs="*", help="image files (default: scikit-image's astronaut, coffee, chelsea)")
    a.add_argument("--out", "-o", required=True, help="output directory")
    a.add_argument("--head", type=int, default=0, help="head for the per-layer raw attention maps (default 0)")
    a.add_argument("--discard-ratio", type=float, default=0.0,
                   help="rollout: drop this fraction of the weakest attention weights per layer (default 0)")
    a.add_argument("--mask-ratio", type=float, default=None,
                   help="masked-image reconstructions: fraction of patches hidden (default: the run's own)")
    a.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="MAE: whether the model predicts per-patch normalised pixels (default: from the checkpoint)")
    a.add_argument("--num-filters", type=int, default=28, help="principal components of the patch filters to draw")
    a.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    a.add_argument("--seed", type=int, default=0, help="seed of the MAE masks")
    a.add_argument("--only", default=None, help="comma-separated subset of: rollout, layers, distance, pos_embed, "
                                                "filters, mae (default: all that apply)")
    a.add_argument("--model", default=None, help="model name, only for safetensors files without vitscale metadata")
    a.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of such a file when its width is not --model's (no qk-norm to tell)")
    a.set_defaults(func=run_analyze)
    return a


def run_analyze(args: argparse.Namespace) -> int:
    from vitscale.analysis.run import analyze

    analyze(args.ckpt, args.images, args.out, head=args.head, discard_ratio=args.discard_ratio,
            mask_ratio=args.mask_ratio, device=args.device, seed=args.seed, model_name=args.model,
            num_heads=args.num_heads,
            num_filters=args.num_filters, norm_pix_loss=args.norm_pix_loss,
            only=[s.strip() for s in args.only.split(",") if s.strip()] if args.only else None)
    return 0
