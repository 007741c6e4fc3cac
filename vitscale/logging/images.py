"""MAE reconstructions as pictures: original | masked | prediction | prediction with visible patches pasted."""
from __future__ import annotations

from pathlib import Path

import torch

from vitscale.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


@torch.no_grad()
def mae_panels(mae: torch.nn.Module, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 4, 3, H, W) in [0, 1] from normalised `images`, the decoder's `pred` (B, L, p*p*3) and `mask` (B, L).

    With norm_pix_loss the prediction is in per-patch normalised units; it is mapped back with the
    original patch's mean and variance (as the MAE paper's visualisations do).
    """
    images, pred, mask = images.float(), pred.float(), mask.float()
    target = mae.patchify(images)
    if getattr(mae, "norm_pix_loss", False):
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6).sqrt() + mean
    m = mask.unsqueeze(-1)
    masked = mae.unpatchify(target * (1 - m))
    recon = mae.unpatchify(pred)
    pasted = mae.unpatchify(target * (1 - m) + pred * m)
    panels = [_to_unit(images), _to_unit(masked) * _visible(mae, mask), _to_unit(recon), _to_unit(pasted)]
    return torch.stack(panels, dim=1).cpu()


def _visible(mae: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """1 on visible pixels, 0 on masked ones (so masked patches show black, not grey)."""
    p = mae.patch_size
    ones = torch.ones(mask.shape[0], mask.shape[1], p * p * mae.in_chans, device=mask.device)
    return mae.unpatchify(ones * (1 - mask.float()).unsqueeze(-1))


def save_mae_grid(panels: torch.Tensor, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = panels.shape[0]
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c, name in enumerate(["original", "masked", "prediction", "prediction + visible"]):
            ax = axes[r][c]
            ax.imshow(panels[r, c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
