"""``vitscale eval robustness``: the ViT and a ResNet-18 trained on the same data and steps, through the same
robustness curves; ``robustness.json``, one PNG per curve, rows for the summary table."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from vitscale.data.transforms import EvalTransform
from vitscale.eval.baseline import (BASELINE_FILE, BaselineConfig, count_params, forward_flops, load_baseline,
    resnet18_params, save_baseline, train_baseline, width_for_params)
from vitscale.eval.classify import evaluate_classifier, require_classifier
from vitscale.eval.features import check_labels, load_images
from vitscale.eval.plots import plot_corruptions, plot_robustness_curve
from vitscale.eval.robustness import CURVES, check_image_size, config_dict, robustness_curves


def baseline_config(info: dict, opts, width: int) -> BaselineConfig:
    """Same steps, batch size, seed and augmentation as the ViT's run where known (a checkpoint directory
    records them; an exported file records only the step), else the flags / demo defaults."""
    data = info.get("data_config") or {}
    steps = opts.baseline_steps or info.get("step") or BaselineConfig.steps
    return BaselineConfig(steps=int(steps), batch_size=int(opts.baseline_batch_size or data.get("batch_size")
                                                            or BaselineConfig.batch_size),
                          lr=opts.baseline_lr, width=width, seed=opts.seed,
                          crop_min_scale=float(data.get("crop_min_scale", BaselineConfig.crop_min_scale)),
                          interpolation=EvalTransform.of_run(data).interpolation,
                          num_workers=opts.num_workers)


def baseline_width(vit_params: int, num_classes: int, opts, say) -> int:
    """``--baseline-width`` if given, else the width whose ResNet-18 has about the ViT's parameter count."""
    if opts.baseline_width is not None:
        if opts.baseline_width < 1:
            raise ValueError(f"--baseline-width must be >= 1, got {opts.baseline_width}")
        width, how = opts.baseline_width, "set by --baseline-width"
    else:
        width, how = width_for_params(vit_params, num_classes), "sized to the ViT's parameter count"
    say(f"baseline: ResNet-18 width {width}, {_millions(resnet18_params(num_classes, width))} parameters "
        f"({how}; the ViT has {_millions(vit_params)})")
    return width


def get_baseline(info: dict, vit_params: int, train_set, num_classes: int, img_size: int, accelerator, opts, say
                 ) -> tuple[nn.Module, dict]:
    """The CNN baseline: loaded from ``--baseline-ckpt``, or trained (and saved) on the ViT's data and steps."""
    if opts.baseline_ckpt:
        model, record = load_baseline(opts.baseline_ckpt, accelerator.device)
        say(f"baseline: loaded {opts.baseline_ckpt} (ResNet-18 width {record['config']['width']}, "
            f"{_millions(count_params(model))} parameters; the ViT has {_millions(vit_params)})")
        return model, {**record, "path": str(opts.baseline_ckpt)}
    cfg = baseline_config(info, opts, baseline_width(vit_params, num_classes, opts, say))
    say(f"baseline: training it for {cfg.steps} steps of {cfg.batch_size} images on the ViT's training shards")
    model, record = train_baseline(train_set, num_classes, img_size, cfg, accelerator, log=say)
    if accelerator.is_main_process:
        path = save_baseline(model, record, num_classes, Path(opts.out) / BASELINE_FILE)
        record = {**record, "path": str(path)}
        say(f"baseline: saved {path} (reuse it with --baseline-ckpt)")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, record


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def run_robustness(vit: nn.Module, info: dict, train_set, val_set, num_classes: int, img_size: int, accelerator,
                   opts, base: dict, robustness_tables: list, say, view: EvalTransform = EvalTransform()) -> dict:
    """The robustness evaluation of ``vit`` (and the CNN baseline): the JSON document; writes the PNGs and appends
    the summary table to ``robustness_tables``."""
    require_classifier(vit, "robustness", num_classes)
    if opts.baseline not in ("resnet18", "none"):
        raise ValueError(f"--baseline must be resnet18 or none, got {opts.baseline!r}")
    cfg = opts.robustness
    cfg.seed = opts.seed
    cfg.batch_size = opts.batch_size
    cfg.validate()
    grid = cfg.occlusion_grid if cfg.occlusion_grid is not None else info["grid_size"][0]
    check_image_size(cfg, img_size, grid)  # before the images load, the baseline trains and any curve runs
    data = _eval_images(train_set, val_set, img_size, accelerator, cfg, opts.batch_size, view)
    models, extra = _models(vit, info, train_set, num_classes, img_size, accelerator, opts, say)
    results = {}
    for name, model in models.items():
        plain = evaluate_classifier(model, val_set, accelerator, img_size=img_size, batch_size=opts.batch_size,
                                    view=view)
        res = robustness_curves(model, data["images"], data["labels"], cfg, accelerator, grid, data["train_images"],
                                data["train_labels"], log=say, name=name)
        results[name] = {**res, "plain_eval": plain, **extra[name]}
    doc = {"evaluation": "robustness", **base, "images": int(data["images"].shape[0]), "occlusion_grid": grid,
           "config": config_dict(cfg), "models": results}
    if accelerator.is_main_process:
        _plots(results, cfg, grid, data, Path(opts.out), say)
    robustness_tables.append(_table(results, cfg))
    return doc


def _eval_images(train_set, val_set, img_size: int, accelerator, cfg, batch_size: int, view: EvalTransform
                 ) -> dict:
    """The held-out images and labels the curves use, and the training images the adversarial patch is fit on."""
    images, labels = load_images(val_set, img_size, accelerator, batch_size=batch_size, view=view)
    check_labels(labels, "held-out shards")
    data = {"images": images, "labels": labels, "train_images": None, "train_labels": None}
    if "adversarial_patch" in cfg.curves:
        data["train_images"], data["train_labels"] = load_images(train_set, img_size, accelerator,
                                                                 batch_size=batch_size, limit=cfg.pgd_images,
                                                                 view=view)
        check_labels(data["train_labels"], "training shards")
    return data


def _models(vit: nn.Module, info: dict, train_set, num_classes: int, img_size: int, accelerator, opts, say
            ) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The models compared, by display name, and what the JSON records about each (size, cost, the baseline's
    training record)."""
    vit_params = count_params(vit)
    models: dict[str, nn.Module] = {f"ViT ({info['name']})": vit}
    if opts.baseline == "resnet18":
        cnn, record = get_baseline(info, vit_params, train_set, num_classes, img_size, accelerator, opts, say)
        models["ResNet-18"] = cnn
    extra = {name: {"params": count_params(m), "flops_per_image": forward_flops(m, img_size, accelerator.device)}
             for name, m in models.items()}
    if "ResNet-18" in models:
        extra["ResNet-18"].update({"baseline": {k: v for k, v in record.items() if k != "loss"},
                                   "train_loss_first_last": [record["loss"][0], record["loss"][-1]]
                                   if "loss" in record else None})
    return models, extra


def _plots(results: dict, cfg, grid: int, data: dict, out: Path, say) -> None:
    title = f"{int(data['images'].shape[0])} held-out images"
    detail = {"occlusion_patches": f", {grid}×{grid} cells, {cfg.occlusion_fill} fill",
              "occlusion_boxes": f", {cfg.occlusion_fill} fill",
              "adversarial_patch": f", {cfg.pgd_steps} PGD steps on {int(data['train_images'].shape[0])} training "
                                   f"images" if data["train_images"] is not None else "",
              "corruptions": f", {len(cfg.corruptions)} types"}
    for curve in CURVES:
        if curve in cfg.curves:
            path = plot_robustness_curve(results, curve, out / f"robustness_{curve}.png",
                                         title + detail.get(curve, "") + f", {cfg.repeats} draws"
                                         if curve != "corruptions" else title + detail[curve])
            say(f"wrote {path}")
    if "corruptions" in cfg.curves:
        say(f"wrote {plot_corruptions(results, out / 'robustness_corruptions_all.png', title)}")


def _table(results: dict, cfg) -> list[list[str]]:
    """Rows of the summary: each model's size and cost, then top-1 (%) clean and at every level of every curve."""
    names = list(results)
    table = [["curve (top-1 %)", "level"] + names,
             ["parameters", "-"] + [_millions(results[n]["params"]) for n in names],
             ["MFLOPs / image", "-"] + [f"{results[n]['flops_per_image'] / 1e6:.1f}" for n in names],
             ["clean", "-"] + [_pct(results[n]["clean_acc"]) for n in names]]
    for curve in cfg.curves:
        xs = results[names[0]]["curves"][curve]["x"]
        for i in range(1, len(xs)):
            table.append([curve if i == 1 else "", str(xs[i])] +
                         [_pct(results[n]["curves"][curve]["acc"][i]) for n in names])
    return table


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"
