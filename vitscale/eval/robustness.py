"""The ViT paper's robustness probes, for any classifier ``model(normalised images) -> logits``.

Images stay uint8 until a batch is perturbed: ``x = uint8 / 255`` (as ``data.transforms.normalize`` does), a
perturbation maps ``x`` in [0, 1] to [0, 1], then the ImageNet mean/std normalisation. Level 0 of every curve is
the identity, so it reproduces the clean accuracy exactly (same inputs, same batches, bit for bit).

Randomness (which patches, where a box or a patch goes, noise) comes from a generator seeded by
``(seed, curve, repeat, chunk)`` and *not* by the level: the draws are the same at every level, so the occluded
sets are nested (a larger fraction hides a superset of the patches) and the average curve is not made noisy by
re-drawing. Each curve is averaged over ``repeats`` draws.

Data parallel: chunk ``c`` of the images is evaluated by rank ``c % world_size``; correct counts are summed.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.pixels import IMAGENET_MEAN, normalize_unit
from vitscale.eval.corruptions import CORRUPTIONS, SEVERITIES, check_corruptions, corrupt

Perturb = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _seed(*parts) -> int:
    """A 63-bit seed from a tag and integers, stable across processes and Python versions (no hash())."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode() + b"|")
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFFFFFFFFFF


@dataclass
class RobustnessConfig:
    # Fractions of the patch grid hidden (filled with occlusion_fill).
    occlusion_fractions: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
    # Areas (fraction of the image) of one random square box filled with occlusion_fill.
    box_areas: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5)
    # Patch-shuffle grids: the image is cut into g x g cells that are randomly permuted (1 = unchanged).
    shuffle_grids: Sequence[int] = (1, 2, 4, 8)
    # Areas (fraction of the image) of the adversarial patch (and of the random-noise control patch).
    patch_areas: Sequence[float] = (0.0, 0.02, 0.05, 0.1, 0.2)
    corruptions: Sequence[str] = CORRUPTIONS
    repeats: int = 3
    pgd_steps: int = 50
    pgd_step_size: float = 0.05  # per signed-gradient step, pixels in [0, 1]
    pgd_batch_size: int = 64
    pgd_images: int = 512  # training images the patch is optimised on (never the evaluation images)
    batch_size: int = 256
    seed: int = 0
    occlusion_grid: Optional[int] = None  # default: the ViT's patch grid (e.g. 8 for 32 px / patch 4)
    # What hidden pixels become: "black" (0, as Naseer et al.'s PatchDrop) or "mean" (the ImageNet mean
    # colour, i.e. exactly 0 after normalisation).
    occlusion_fill: str = "black"
    curves: Sequence[str] = field(default_factory=lambda: list(CURVES))

    def validate(self) -> None:
        for name, values, lo, hi in (("occlusion fraction", self.occlusion_fractions, 0.0, 1.0),
                                     ("box area", self.box_areas, 0.0, 1.0),
                                     ("patch area", self.patch_areas, 0.0, 1.0)):
            if not values or any(not lo <= v <= hi for v in values):
                raise ValueError(f"each {name} must be in [{lo}, {hi}], got {list(values)}")
        if not self.shuffle_grids or any(g < 1 for g in self.shuffle_grids):
            raise ValueError(f"shuffle grids must be >= 1, got {list(self.shuffle_grids)}")
        if self.occlusion_grid is not None and self.occlusion_grid < 1:  # 0 silently became the ViT's grid
            raise ValueError(f"--occlusion-grid must be >= 1 (cells per side), got {self.occlusion_grid}")
        check_corruptions(self.corruptions)
        if self.repeats < 1 or self.pgd_steps < 0 or self.batch_size < 1:
            raise ValueError("repeats and batch_size must be >= 1, pgd_steps >= 0")
        if self.occlusion_fill not in FILLS:
            raise ValueError(f"occlusion fill must be one of {', '.join(FILLS)}, got {self.occlusion_fill!r}")
        unknown = [c for c in self.curves if c not in CURVES]
        if unknown:
            raise ValueError(f"unknown robustness curve(s) {unknown}: choose from {', '.join(CURVES)}")


def check_image_size(cfg: RobustnessConfig, img_size: int, grid: int) -> None:
    """The options whose validity depends on the model's image size, for the curves requested: the patch-shuffle
    grids and the occlusion grid must divide it (a cell of a non-dividing occlusion grid is 6 or 7 pixels, so a
    "fraction of patches" hides another fraction of the image). Checked before the CNN baseline trains and any
    curve runs: a shuffle grid that did not divide failed only at the patch-shuffle curve, minutes or hours in."""
    divisors = [d for d in range(1, img_size + 1) if img_size % d == 0]
    if "patch_shuffle" in cfg.curves:
        bad = [str(g) for g in cfg.shuffle_grids if img_size % g]
        if bad:
            what = f"grid {bad[0]} does" if len(bad) == 1 else f"grids {', '.join(bad)} do"
            raise ValueError(f"--shuffle-grids: {what} not divide the image size {img_size}: use divisors of "
                             f"{img_size} ({', '.join(map(str, divisors))})")
    if "occlusion_patches" in cfg.curves and (grid < 1 or img_size % grid):
        raise ValueError(f"--occlusion-grid {grid} does not divide the image size {img_size}: use a divisor of "
                         f"{img_size} ({', '.join(map(str, divisors))})")


CURVES = ("occlusion_patches", "occlusion_boxes", "patch_shuffle", "adversarial_patch", "corruptions")
# Curves along which accuracy should not rise on average (checked by the tests, reported in the JSON).
MONOTONE = ("occlusion_patches", "occlusion_boxes")


FILLS = {"black": (0.0, 0.0, 0.0), "mean": IMAGENET_MEAN}


def _fill(name: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(FILLS[name], dtype=dtype).view(1, 3, 1, 1)


# ----- perturbations on x in [0, 1] -----------------------------------------------------------------------------
def occlude_patches(x: torch.Tensor, fraction: float, grid: int, g: torch.Generator, fill: str = "black"
                    ) -> torch.Tensor:
    """Hide round(fraction * grid^2) random cells of a grid x grid partition (first k of one permutation per
    image, so larger fractions hide supersets)."""
    b, _, h, w = x.shape
    n = grid * grid
    order = torch.rand(b, n, generator=g).argsort(dim=1)
    k = round(fraction * n)
    if k == 0:
        return x
    hidden = torch.zeros(b, n, dtype=torch.bool)
    hidden.scatter_(1, order[:, :k], True)
    mask = hidden.view(b, 1, grid, grid).float()
    mask = F.interpolate(mask, size=(h, w), mode="nearest").bool()
    return torch.where(mask, _fill(fill, x.dtype), x)


def occlude_box(x: torch.Tensor, area: float, g: torch.Generator, fill: str = "black") -> torch.Tensor:
    """One square box of ``area`` x image area at a random place per image. The place is an anchor u in
    [0, 1]^2 with top = u (H - side): for a fixed u, a larger box contains the smaller one."""
    b, _, h, w = x.shape
    u = torch.rand(b, 2, generator=g)
    side = round(math.sqrt(area * h * w))
    if side == 0:
        return x
    sh, sw = min(side, h), min(side, w)
    out = x.clone()
    for i in range(b):
        top, left = int(u[i, 0] * (h - sh)), int(u[i, 1] * (w - sw))
        out[i, :, top:top + sh, left:left + sw] = _fill(fill, x.dtype)[0]
    return out


def shuffle_patches(x: torch.Tensor, grid: int, g: torch.Generator) -> torch.Tensor:
    """Cut into grid x grid cells (the image side must divide) and permute them randomly per image."""
    b, c, h, w = x.shape
    perms = torch.rand(b, grid * grid, generator=g).argsort(dim=1)
    if grid == 1:
        return x
    if h % grid or w % grid:
        raise ValueError(f"patch shuffle grid {grid} does not divide the image size {h}x{w}")
    ph, pw = h // grid, w // grid
    cells = x.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)
    cells = cells[torch.arange(b)[:, None], perms]
    return cells.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def patch_side(area: float, img_size: int) -> int:
    return min(img_size, round(math.sqrt(area) * img_size))


def paste_patch(x: torch.Tensor, patch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Paste ``patch`` (3, s, s) at a uniformly random position per image (differentiable in ``patch``)."""
    b, _, h, w = x.shape
    s = patch.shape[-1]
    rows = torch.randint(0, h - s + 1, (b,), generator=g)
    cols = torch.randint(0, w - s + 1, (b,), generator=g)
    if s == 0:
        return x
    out = x.clone()
    for i in range(b):
        out[i, :, rows[i]:rows[i] + s, cols[i]:cols[i] + s] = patch
    return out


def optimise_patch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, side: int, cfg: RobustnessConfig,
                   device: torch.device) -> torch.Tensor:
    """A universal adversarial patch (Brown et al., 2017): its pixels are optimised by projected gradient
    ascent (signed steps, clipped to [0, 1]) on the cross-entropy of ``images`` with the patch pasted at random
    positions, so it fools the model wherever it lands. Every rank computes the same patch."""
    g = torch.Generator().manual_seed(_seed("adv-patch", cfg.seed, side))
    patch = torch.rand(3, side, side, generator=g)
    for _ in range(cfg.pgd_steps if side > 0 else 0):
        idx = torch.randint(0, images.shape[0], (min(cfg.pgd_batch_size, images.shape[0]),), generator=g)
        x = images[idx].float().div(255)
        p = patch.clone().requires_grad_(True)
        xp = paste_patch(x, p, g)
        loss = F.cross_entropy(model(normalize_unit(xp.to(device))).float(), labels[idx].to(device))
        (grad,) = torch.autograd.grad(loss, p)
        patch = (patch + cfg.pgd_step_size * grad.sign()).clamp(0, 1)
    return patch.detach()


# ----- evaluation ------------------------------------------------------------------------------------------------
@torch.no_grad()
def correct_under(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, perturb: Optional[Perturb],
                  tag: str, cfg: RobustnessConfig, accelerator, repeats: int = 1) -> tuple[int, int]:
    """(correct, evaluated) over all ranks with ``perturb`` applied (None = clean), over ``repeats`` seeded draws."""
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    correct, total = 0, 0
    for r in range(repeats):
        for c, start in enumerate(range(0, images.shape[0], cfg.batch_size)):
            if c % world != rank:
                continue
            x = images[start:start + cfg.batch_size].float().div(255)
            if perturb is not None:
                x = perturb(x, torch.Generator().manual_seed(_seed(tag, cfg.seed, r, c)))
            with accelerator.autocast():
                logits = model(normalize_unit(x.to(device)))
            y = labels[start:start + cfg.batch_size].to(device)
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
    if world > 1:
        counts = accelerator.reduce(torch.tensor([correct, total], device=device), reduction="sum")
        correct, total = (int(v) for v in counts.tolist())
    return correct, total


def accuracy_under(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, perturb: Optional[Perturb],
                   tag: str, cfg: RobustnessConfig, accelerator, repeats: int = 1) -> float:
    """Top-1 accuracy with ``perturb`` applied (None = clean), averaged over ``repeats`` seeded draws.
    A ratio of integer counts, so a level that changes nothing gives exactly the clean accuracy."""
    correct, total = correct_under(model, images, labels, perturb, tag, cfg, accelerator, repeats)
    return correct / max(total, 1)


def robustness_curves(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: RobustnessConfig,
                      accelerator, grid: int, train_images: Optional[torch.Tensor] = None,
                      train_labels: Optional[torch.Tensor] = None, log=print, name: str = "model") -> dict:
    """All requested curves for one model: ``{"clean_acc", "curves": {curve: {"x", "acc", ...}}}``."""
    cfg.validate()
    img_size = images.shape[-1]
    check_image_size(cfg, img_size, grid)
    model.eval()
    clean = accuracy_under(model, images, labels, None, "clean", cfg, accelerator)
    out: dict = {"clean_acc": clean, "curves": {}}
    curves = out["curves"]
    rep, fill = cfg.repeats, cfg.occlusion_fill
    if "occlusion_patches" in cfg.curves:
        acc = [accuracy_under(model, images, labels, lambda x, g, f=f: occlude_patches(x, f, grid, g, fill),
                              "occlusion_patches", cfg, accelerator, rep) for f in cfg.occlusion_fractions]
        curves["occlusion_patches"] = {"x": list(cfg.occlusion_fractions), "acc": acc, "grid": grid,
                                       "xlabel": "fraction of patches hidden"}
    if "occlusion_boxes" in cfg.curves:
        acc = [accuracy_under(model, images, labels, lambda x, g, a=a: occlude_box(x, a, g, fill), "occlusion_boxes",
                              cfg, accelerator, rep) for a in cfg.box_areas]
        curves["occlusion_boxes"] = {"x": list(cfg.box_areas), "acc": acc, "xlabel": "box area (fraction of image)"}
    if "patch_shuffle" in cfg.curves:
        acc = [accuracy_under(model, images, labels, lambda x, g, s=s: shuffle_patches(x, s, g), "patch_shuffle",
                              cfg, accelerator, rep) for s in cfg.shuffle_grids]
        curves["patch_shuffle"] = {"x": list(cfg.shuffle_grids), "acc": acc, "xlabel": "shuffle grid size"}
    if "adversarial_patch" in cfg.curves:
        if train_images is None or train_labels is None:
            raise ValueError("the adversarial patch is optimised on training images: none given")
        adv, noise = [], []
        for area in cfg.patch_areas:
            side = patch_side(area, img_size)
            with torch.enable_grad():
                patch = optimise_patch(model, train_images, train_labels, side, cfg, accelerator.device)
            control = torch.rand(3, side, side, generator=torch.Generator().manual_seed(_seed("noise-patch", side)))
            adv.append(accuracy_under(model, images, labels, lambda x, g, p=patch: paste_patch(x, p, g), "patch",
                                      cfg, accelerator, rep))
            noise.append(accuracy_under(model, images, labels, lambda x, g, p=control: paste_patch(x, p, g),
                                        "patch", cfg, accelerator, rep))
        curves["adversarial_patch"] = {"x": list(cfg.patch_areas), "acc": adv, "random_patch_acc": noise,
                                       "xlabel": "patch area (fraction of image)", "pgd_steps": cfg.pgd_steps}
    if "corruptions" in cfg.curves:
        counts = {cname: [correct_under(model, images, labels, lambda x, g, n=cname, s=s: corrupt(x, n, s, g),
                                        "corruption-" + cname, cfg, accelerator) for s in range(SEVERITIES + 1)]
                  for cname in cfg.corruptions}
        per = {cname: [c / max(t, 1) for c, t in v] for cname, v in counts.items()}
        # Mean over corruption types as pooled counts (equal image counts per type): exact at severity 0.
        mean = [sum(v[s][0] for v in counts.values()) / max(sum(v[s][1] for v in counts.values()), 1)
                for s in range(SEVERITIES + 1)]
        curves["corruptions"] = {"x": list(range(SEVERITIES + 1)), "acc": mean, "per_corruption": per,
                                 "xlabel": "severity (mean over corruptions)"}
    for key, curve in curves.items():
        curve["monotone_expected"] = key in MONOTONE
    log(f"robustness {name}: clean {100 * clean:.1f}%, " + ", ".join(
        f"{k} {100 * v['acc'][-1]:.1f}% at {v['x'][-1]}" for k, v in curves.items()))
    return out


def config_dict(cfg: RobustnessConfig) -> dict:
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in asdict(cfg).items()}
