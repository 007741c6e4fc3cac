"""``vitscale eval robustness``: the ViT and a ResNet-18 trained on the same data and steps, through the same
robustness curves; ``robustness.json``, one PNG per curve, rows for the summary table."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from vitscale.eval.baseline import BASELINE_FILE, BaselineConfig, load_baseline, save_baseline, train_baseline
from vitscale.eval.classify import evaluate_classifier, require_classifier
from vitscale.eval.features import check_labels, load_images
from vitscale.eval.robustness import CURVES, config_dict, robustness_curves


def baseline_config(info: dict, opts) -> BaselineConfig:
    """Same steps, batch size, seed and augmentation as the ViT's run where known (a checkpoint directory
    records them; an exported file records only the step), else the flags / demo defaults."""
    data = info.get("data_config") or {}
    steps = opts.baseline_steps or info.get("step") or BaselineConfig.steps
    return BaselineConfig(steps=int(steps), batch_size=int(opts.baseline_batch_size or data.get("batch_size")
                                                            or BaselineConfig.batch_size),
                          lr=opts.baseline_lr, width=opts.baseline_width, seed=opts.seed,
                          crop_min_scale=float(data.get("crop_min_scale", BaselineConfig.crop_min_scale)),
                          num_workers=opts.num_workers)


def get_baseline(info: dict, train_set, num_classes: int, img_size: int, accelerator, opts, say
                 ) -> tuple[nn.Module, dict]:
    if opts.baseline_ckpt:
        model, record = load_baseline(opts.baseline_ckpt, accelerator.device)
        say(f"baseline: loaded {opts.baseline_ckpt}")
        return model, {**record, "path": str(opts.baseline_ckpt)}
    cfg = baseline_config(info, opts)
    say(f"baseline: training ResNet-18 (width {cfg.width}) for {cfg.steps} steps of {cfg.batch_size} images "
        f"on the ViT's training shards")
    model, record = train_baseline(train_set, num_classes, img_size, cfg, accelerator, log=say)
    if accelerator.is_main_process:
        path = save_baseline(model, record, num_classes, Path(opts.out) / BASELINE_FILE)
        record = {**record, "path": str(path)}
        say(f"baseline: saved {path} (reuse it with --baseline-ckpt)")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, record


def run_robustness(vit: nn.Module, info: dict, train_set, val_set, num_classes: int, img_size: int, accelerator,
                   opts, base: dict, robustness_tables: list, say) -> dict:
    from vitscale.eval.plots import plot_corruptions, plot_robustness_curve

    require_classifier(vit, "robustness")
    if opts.baseline not in ("resnet18", "none"):
        raise ValueError(f"--baseline must be resnet18 or none, got {opts.baseline!r}")
    cfg = opts.robustness
    cfg.seed = opts.seed
    cfg.batch_size = opts.batch_size
    images, labels = load_images(val_set, img_size, accelerator, batch_size=opts.batch_size)
    check_labels(labels, "held-out shards")
    train_images = train_labels = None
    if "adversarial_patch" in cfg.curves:
        train_images, train_labels = load_images(train_set, img_size, accelerator, batch_size=opts.batch_size,
                                                 limit=cfg.pgd_images)
        check_labels(train_labels, "training shards")
    grid = cfg.occlusion_grid or info["grid_size"][0]

    models: dict[str, nn.Module] = {f"ViT ({info['name']})": vit}
    extra: dict[str, dict] = {}
    if opts.baseline == "resnet18":
        cnn, record = get_baseline(info, train_set, num_classes, img_size, accelerator, opts, say)
        models["ResNet-18"] = cnn
        extra["ResNet-18"] = {"baseline": {k: v for k, v in record.items() if k != "loss"},
                              "train_loss_first_last": [record["loss"][0], record["loss"][-1]] if "loss" in record
                              else None}
    results = {}
    for name, model in models.items():
        plain = evaluate_classifier(model, val_set, accelerator, img_size=img_size, batch_size=opts.batch_size)
        res = robustness_curves(model, images, labels, cfg, accelerator, grid, train_images, train_labels,
                                log=say, name=name)
        results[name] = {**res, "plain_eval": plain, **extra.get(name, {})}

    out = Path(opts.out)
    doc = {"evaluation": "robustness", **base, "images": int(images.shape[0]), "occlusion_grid": grid,
           "config": config_dict(cfg), "models": results}
    if accelerator.is_main_process:
        title = f"{int(images.shape[0])} held-out images"
        detail = {"occlusion_patches": f", {grid}×{grid} cells, {cfg.occlusion_fill} fill",
                  "occlusion_boxes": f", {cfg.occlusion_fill} fill",
                  "adversarial_patch": f", {cfg.pgd_steps} PGD steps on {int(train_images.shape[0])} training images"
                  if train_images is not None else "",
                  "corruptions": f", {len(cfg.corruptions)} types"}
        for curve in CURVES:
            if curve in cfg.curves:
                path = plot_robustness_curve(results, curve, out / f"robustness_{curve}.png",
                                             title + detail.get(curve, "") + f", {cfg.repeats} draws"
                                             if curve != "corruptions" else title + detail[curve])
                say(f"wrote {path}")
        if "corruptions" in cfg.curves:
            say(f"wrote {plot_corruptions(results, out / 'robustness_corruptions_all.png', title)}")
    names = list(results)
    table = [["curve (top-1 %)", "level"] + names, ["clean", "-"] + [_pct(results[n]["clean_acc"]) for n in names]]
    for curve in cfg.curves:
        xs = results[names[0]]["curves"][curve]["x"]
        for i in range(1, len(xs)):
            table.append([curve if i == 1 else "", str(xs[i])] +
                         [_pct(results[n]["curves"][curve]["acc"][i]) for n in names])
    robustness_tables.append(table)
    return doc


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"
