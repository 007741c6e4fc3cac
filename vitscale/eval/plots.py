"""Figures for the evaluation results (headless figures from :mod:`vitscale.logging.figures`): one PNG per
evaluation, with title, axis labels and a legend naming every line (e.g. trained vs random init, ViT vs
ResNet-18)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from vitscale.logging.figures import new_figure, save_figure

PathLike = Union[str, Path]


DPI = 110


def plot_linear(results: dict[str, dict], path: PathLike, title: str) -> Path:
    """Per-epoch probe training loss and held-out accuracy, one line per model variant."""
    fig = new_figure(10, 4, DPI)
    ax1, ax2 = fig.subplots(1, 2)
    for label, r in results.items():
        epochs = [h["epoch"] for h in r["history"]]
        ax1.plot(epochs, [h["train_loss"] for h in r["history"]], label=label)
        ax2.plot(epochs, [100 * h["val_top1"] for h in r["history"]], label=f"{label} ({100 * r['val_top1']:.1f}%)")
    ax1.set(title="linear probe: training loss", xlabel="epoch", ylabel="cross-entropy")
    ax2.set(title="linear probe: held-out top-1", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_knn(results: dict[str, dict], path: PathLike, title: str) -> Path:
    fig = new_figure(6, 4, DPI)
    ax = fig.subplots()
    for label, r in results.items():
        ax.plot(r["curve"]["k"], [100 * a for a in r["curve"]["val_top1"]], marker="o", label=label)
    k = next(iter(results.values()))["k"]
    ax.axvline(k, color="grey", ls="--", lw=1, label=f"reported k = {k}")
    ax.set_xscale("log")
    ax.set(title=title, xlabel="k (neighbours)", ylabel="held-out top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_fewshot(results: dict[str, dict], path: PathLike, title: str) -> Path:
    fig = new_figure(6, 4, DPI)
    ax = fig.subplots()
    for label, r in results.items():
        ax.errorbar(r["shots"], [100 * m for m in r["mean"]], yerr=[100 * s for s in r["std"]], marker="o",
                    capsize=3, label=f"{label} (mean ± std over {r['seeds']} seeds)")
    ax.set_xscale("log")
    shots = next(iter(results.values()))["shots"]
    ax.set_xticks(shots)
    ax.set_xticklabels([str(s) for s in shots])
    ax.set(title=title, xlabel="training images per class", ylabel="held-out top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


_TITLES = {
    "occlusion_patches": "Occlusion: random patches hidden",
    "occlusion_boxes": "Occlusion: one random box blanked",
    "patch_shuffle": "Patch shuffle: image cut into g×g cells, permuted",
    "adversarial_patch": "Adversarial patch (PGD-optimised, random position)",
    "corruptions": "Common corruptions (mean over corruption types)",
}


def plot_robustness_curve(models: dict[str, dict], curve: str, path: PathLike, title: str) -> Path:
    """One robustness curve for every model (solid); the adversarial patch also shows its random-noise
    control patch (dashed)."""
    fig = new_figure(6.5, 4.2, DPI)
    ax = fig.subplots()
    for i, (name, res) in enumerate(models.items()):
        c = res["curves"][curve]
        color = f"C{i}"
        ax.plot(c["x"], [100 * a for a in c["acc"]], marker="o", color=color,
                label=f"{name} (clean {100 * res['clean_acc']:.1f}%)")
        if "random_patch_acc" in c:
            ax.plot(c["x"], [100 * a for a in c["random_patch_acc"]], marker="x", ls="--", color=color,
                    label=f"{name}: random-noise patch")
    ax.set(title=f"{_TITLES.get(curve, curve)}\n{title}", xlabel=next(iter(models.values()))["curves"][curve]["xlabel"],
           ylabel="top-1 accuracy (%)", ylim=(0, 100))
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_corruptions(models: dict[str, dict], path: PathLike, title: str) -> Path:
    """One panel per corruption type: accuracy vs severity for every model."""
    first = next(iter(models.values()))["curves"]["corruptions"]["per_corruption"]
    names = list(first)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = new_figure(3.3 * cols, 2.8 * rows, DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, cname in zip(axes.flat, names):
        for i, (name, res) in enumerate(models.items()):
            acc = res["curves"]["corruptions"]["per_corruption"][cname]
            ax.plot(range(len(acc)), [100 * a for a in acc], marker="o", color=f"C{i}", label=name)
        ax.set(title=cname, xlabel="severity", ylabel="top-1 (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Common corruptions, severity 0 (clean) to 5 — {title}")
    return save_figure(fig, path)
