"""The ``eval`` subcommand: ``add_parser(subparsers)`` registers it (argparse only: imports stay light),
``run_eval_command(args)`` runs it.

Imports sit inside the command functions (measured reason: startup): these modules load on every ``vitscale``
call, and on the shared 2-core test machine ``import vitscale.errors`` takes 0.6 s where ``import torch`` takes
8.6 s; ``vitscale --help`` or a bad argument answers at once, and each command imports what it runs.
"""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Evaluate a pretrained ViT. EVALUATIONS is a comma-separated list of:
  accuracy    top-1 of the checkpoint's own classifier on the held-out shards (plain eval)
  linear      linear probe on frozen features: BatchNorm (no affine) + linear head (MAE recipe)
  knn         weighted k-nearest-neighbour classifier on cosine similarity of frozen features
  fewshot     ridge regression (closed form) on L2-normalised features, --shots per class, --fewshot-seeds seeds
  robustness  occlusion, patch shuffle, adversarial patch, common corruptions; the ViT and a ResNet-18
              of about its parameter count, trained on the same data and steps
  probes      = linear,knn,fewshot (features are extracted once and shared);  all = everything
Each evaluation writes OUT/<name>.json and PNGs; a summary table is printed. Fine-tuning is a training mode:
  vitscale train --config configs/demo_finetune.yaml model.init=CKPT   (docs/finetune.md)
Runs on one process as is; for several GPUs or nodes use `accelerate launch -m vitscale eval ...`."""

EPILOG = """\
examples:
  vitscale eval probes mae.safetensors --data demo:digits --out eval/mae --with-random-init
  vitscale eval robustness runs/demo --data demo:digits --out eval/robust"""


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive_int(text: str) -> int:
    """An integer >= 1 (a probe batch of 0 divides by zero; 0 epochs would report an untrained probe's accuracy)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    """A number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    e = subparsers.add_parser("eval", help="linear probe, kNN, few-shot, robustness (vs a CNN)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("evaluations", metavar="EVALUATIONS", help="e.g. linear,knn,fewshot or probes or robustness")
    e.add_argument("ckpt", metavar="CKPT", help="model.safetensors from `vitscale export`, a checkpoint dir or a "
                                                "run dir (e.g. a fine-tuning run's)")
    _data_flags(e.add_argument_group("data and output"))
    _feature_flags(e.add_argument_group("frozen features (linear, knn, fewshot)"))
    _robustness_flags(e.add_argument_group("robustness"))
    _baseline_flags(e.add_argument_group("robustness: the CNN baseline"))
    e.set_defaults(func=run_eval_command)
    return e


def _data_flags(g) -> None:
    g.add_argument("--data", default=None, help="training shards (spec as data.train_shards, e.g. demo:digits); "
                                                "default: the run's own when CKPT is a checkpoint directory")
    g.add_argument("--val-data", default=None, help="held-out shards (default: demo:X:val for demo:X, or the run's)")
    g.add_argument("--cache-dir", default=None, help="where demo shards are built (default: the run's "
                                                      "data.cache_dir for a checkpoint dir, else data_cache)")
    g.add_argument("--out", "-o", default="eval", help="output directory (default ./eval)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if present")
    g.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"), help="autocast (default fp32)")
    g.add_argument("--batch-size", type=_positive_int, default=256,  # 0 put the whole split in one batch
                   help="images per forward pass for evaluation")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    g.add_argument("--seed", type=int, default=0, help="seed of probes, random init, fine-tuning, perturbations")
    g.add_argument("--model", dest="model_name", default=None,
                   help="model name, only for safetensors files without vitscale metadata")
    g.add_argument("--num-heads", type=_positive_int, default=None,
                   help="attention heads of such a file when its width is not --model's (no qk-norm to tell)")
    g.add_argument("--crop-pct", type=_fraction, default=None,
                   help="held-out images: shorter side resized to size / crop-pct, then centre-cropped (default: "
                        "the run's data.eval_crop_pct, else 0.875)")
    g.add_argument("--interpolation", default=None, choices=("bilinear", "bicubic"),
                   help="of that resize (default: the run's data.interpolation, else bilinear)")


def _feature_flags(f) -> None:
    f.add_argument("--pool", default="auto", choices=("auto", "model", "token", "avg"),
                   help="model = the model's own pre-logits ([CLS] or mean, then its norm); token = [CLS]; "
                        "avg = mean of patch tokens; auto = avg for MAE encoders (MAE trains the patch tokens, "
                        "not [CLS]), model otherwise")
    f.add_argument("--random-init", action="store_true",
                   help="evaluate the same architecture with seeded random weights instead of the checkpoint's")
    f.add_argument("--with-random-init", action="store_true",
                   help="also evaluate the random-init baseline, side by side (JSON, plots, summary)")
    f.add_argument("--probe-epochs", type=_positive_int, default=100, help="linear probe epochs (default 100)")
    f.add_argument("--probe-batch-size", type=_positive_int, default=256)
    f.add_argument("--probe-blr", type=float, default=0.1, help="linear probe base LR (lr = blr x batch / 256)")
    f.add_argument("--probe-weight-decay", type=float, default=0.0)
    f.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    f.add_argument("--temperature", type=float, default=0.07, help="kNN vote weight exp(sim / T) (default 0.07)")
    f.add_argument("--shots", type=_ints, default=[1, 5, 10, 25], help="few-shot sizes per class (default 1,5,10,25)")
    f.add_argument("--fewshot-seeds", type=_positive_int, default=5, help="random draws of the few-shot sets (default 5)")
    f.add_argument("--ridge-reg", type=float, default=1e-3, help="few-shot ridge L2 regularisation (default 1e-3)")


# Robustness flags left unset keep RobustnessConfig's defaults; each flag's dest is the config field it sets.
ROBUSTNESS_FLAGS = ("curves", "occlusion_fractions", "box_areas", "occlusion_fill", "occlusion_grid", "shuffle_grids",
                    "patch_areas", "corruptions", "repeats", "pgd_steps", "pgd_step_size", "pgd_images")


def _robustness_flags(r) -> None:
    r.add_argument("--curves", type=_names, default=None, help="subset of: occlusion_patches, occlusion_boxes, "
                                                                "patch_shuffle, adversarial_patch, corruptions")
    r.add_argument("--occlusion-fractions", type=_floats, default=None, help="default 0,0.1,0.25,0.5,0.75,0.9")
    r.add_argument("--box-areas", type=_floats, default=None, help="default 0,0.05,0.1,0.2,0.35,0.5")
    r.add_argument("--occlusion-fill", default=None, choices=("black", "mean"),
                   help="hidden pixels: black (default, as PatchDrop) or the mean colour (0 after normalisation)")
    r.add_argument("--occlusion-grid", type=int, default=None, help="cells per side (default: the ViT's patch grid)")
    r.add_argument("--shuffle-grids", type=_ints, default=None, help="default 1,2,4,8")
    r.add_argument("--patch-areas", type=_floats, default=None,
                   help="adversarial patch areas, default 0,0.02,0.05,0.1,0.2")
    r.add_argument("--corruptions", type=_names, default=None, help="default: all (gaussian_noise, shot_noise, "
                   "impulse_noise, gaussian_blur, contrast, brightness, jpeg, pixelate)")
    r.add_argument("--repeats", type=int, default=None, help="random draws averaged per point (default 3)")
    r.add_argument("--pgd-steps", type=int, default=None, help="adversarial patch optimisation steps (default 50)")
    r.add_argument("--pgd-step-size", type=float, default=None, help="signed step on [0,1] pixels (default 0.05)")
    r.add_argument("--pgd-images", type=int, default=None, help="training images the patch is fit on (default 512)")


def _baseline_flags(b) -> None:
    b.add_argument("--baseline", default="resnet18", choices=("resnet18", "none"),
                   help="CNN baseline (default resnet18)")
    b.add_argument("--baseline-ckpt", default=None, help="a baseline_resnet18.pt from an earlier run (skip training)")
    b.add_argument("--baseline-steps", type=int, default=None, help="default: the ViT checkpoint's step")
    b.add_argument("--baseline-batch-size", type=int, default=None,
                   help="default: the ViT run's data.batch_size, else 64")
    b.add_argument("--baseline-width", type=int, default=None,
                   help="ResNet-18 first-stage channels (64 = the standard 11M-parameter ResNet-18); default: the "
                        "width whose parameter count is closest to the ViT's")
    b.add_argument("--baseline-lr", type=float, default=2e-3, help="AdamW peak LR of the baseline")


def build_options(args: argparse.Namespace):
    """argparse namespace -> ``EvalOptions``: every flag whose dest is an option field, and the robustness flags
    that were set."""
    from dataclasses import fields

    from vitscale.eval.robustness import RobustnessConfig
    from vitscale.eval.run import EvalOptions

    rob = RobustnessConfig()
    for name in ROBUSTNESS_FLAGS:
        if getattr(args, name) is not None:
            setattr(rob, name, getattr(args, name))
    flags = [f.name for f in fields(EvalOptions) if f.name != "robustness"]
    values = {name: getattr(args, name) for name in flags if hasattr(args, name)}
    return EvalOptions(**values, robustness=rob)


def run_eval_command(args: argparse.Namespace) -> int:
    from vitscale.eval.run import run_eval

    run_eval(args.evaluations, args.ckpt, build_options(args))
    return 0
