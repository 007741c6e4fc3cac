"""MAE reconstructions as pictures: original | masked | prediction | prediction with visible patches pasted.

The one copy behind both the trainer's periodic ``images/mae_step_*.png`` and ``vitscale analyze``'s
``mae_reconstruction.png``: the norm-pix un-normalisation, the four panels and the figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from vitscale.pixels import denormalize
from vitscale.logging.figures import new_figure, save_figure

COLUMNS = ("original", "masked", "prediction", "prediction + visible")


def prediction_to_pixels(mae: torch.nn.Module, images: torch.Tensor, pred: torch.Tensor,
                         norm_pix_loss: Optional[bool] = None) -> torch.Tensor:
    """The decoder's ``pred`` (B, L, p*p*3) as patches in the normalised pixel space of ``images``.

    With norm_pix_loss the prediction is in per-patch normalised units; it is mapped back with the original
    patch's mean and variance (as the MAE paper's visualisations do), so judge structure, not brightness.
    ``norm_pix_loss`` None: the model's own flag.
    """
    if norm_pix_loss is None:
        norm_pix_loss = getattr(mae, "norm_pix_loss", False)
    pred = pred.float()
    if norm_pix_loss:
        target = mae.patchify(images.float())
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6).sqrt() + mean
    return pred


@torch.no_grad()
def mae_panels(mae: torch.nn.Module, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
               norm_pix_loss: Optional[bool] = None, hidden_fill: float = 0.0) -> torch.Tensor:
    """(B, 4, 3, H, W) in [0, 1] from normalised ``images``, the decoder's ``pred`` (B, L, p*p*3) and ``mask``
    (B, L, 1 = hidden). Hidden patches of the "masked" panel show ``hidden_fill`` (0 = black, 0.5 = grey)."""
    images, mask = images.float(), mask.float()
    pred = prediction_to_pixels(mae, images, pred, norm_pix_loss)
    target = mae.patchify(images)
    m = mask.unsqueeze(-1)
    hidden = mae.unpatchify(m.expand_as(target).contiguous())
    masked = denormalize(mae.unpatchify(target * (1 - m))) * (1 - hidden) + hidden_fill * hidden
    panels = [denormalize(images), masked, denormalize(mae.unpatchify(pred)),
              denormalize(mae.unpatchify(target * (1 - m) + pred * m))]
    return torch.stack(panels, dim=1).cpu()


def _panel_title(column: int, row: int, mask_ratio: Optional[float], mse: Optional[Sequence[float]]) -> str:
    if column == 1 and mask_ratio is not None:
        return f"masked ({100 * mask_ratio:.0f}%)" if row == 0 else ""
    if column == 2 and mse is not None:
        return f"prediction (MSE {mse[row]:.3f})"
    return COLUMNS[column] if row == 0 else ""


def save_mae_grid(panels: torch.Tensor, path: Path, title: str, names: Optional[Sequence[str]] = None,
                  mse: Optional[Sequence[float]] = None, mask_ratio: Optional[float] = None) -> Path:
    """One row per image of ``panels`` (from :func:`mae_panels`), the four columns titled on the first row;
    ``names`` label the rows, ``mse`` (per image, on the hidden patches) goes into the prediction's title."""
    rows = panels.shape[0]
    fig = new_figure(8.8, 2.2 * rows + 0.5)
    axes = fig.subplots(rows, 4, squeeze=False)
    for r in range(rows):
        for c in range(4):
            ax = axes[r][c]
            ax.imshow(panels[r, c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(_panel_title(c, r, mask_ratio, mse), fontsize=8)
        if names is not None:
            axes[r][0].set_ylabel(names[r], fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
