"""Masked-autoencoder pretraining: the model computes its own loss on the masked patches.

Everything MAE-specific outside the model itself lives here: the model's options, FLOPs and the planner's token
counts (the encoder sees the kept patches only), what ``export`` keeps (the encoder), how the MAE release's
weights are recognised, frozen probes' pooling, and the reconstruction pictures (original | masked | prediction |
prediction with visible patches pasted) behind both the trainer's ``images/mae_step_*.png`` and ``vitscale
analyze``'s ``mae_reconstruction.png``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from vitscale.config.schema import ObjectiveConfig
from vitscale.errors import ConfigError
from vitscale.logging.figures import new_figure, save_figure
from vitscale.models import create_model, parse_name
from vitscale.models.mae import tokens_kept
from vitscale.models.flops import train_flops, unwrap
from vitscale.objectives.base import Objective, Picture, model_kwargs
from vitscale.pixels import denormalize

# model.<key> -> MAE keyword, on top of the encoder's MODEL_KWARGS.
DECODER_KWARGS = {"decoder_embed_dim": "decoder_embed_dim", "decoder_depth": "decoder_depth",
                  "decoder_num_heads": "decoder_num_heads", "decoder_mlp_ratio": "decoder_mlp_ratio"}


# The MAE's own tensors beside its encoder's: the decoder and the mask token (the MAE release keeps the encoder's
# keys unprefixed beside them; vitscale's MAE puts them under ``encoder.``).
DECODER_RE = re.compile(r"^(decoder_|mask_token$)")


class MAE(Objective):
    name = "mae"
    probe_pool = "avg"  # the MAE paper probes mean-pooled patch tokens of the encoder
    timm_reference = "vitscale.bench.timm_ref:timm_block_mae"  # the paper's code on timm blocks

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        # The loss is on the hidden patches only: a mask ratio of 0 hides none (no loss to learn from). The [0, 1)
        # range every objective gets is checked by the config; this is MAE's stricter lower end.
        ratio = cfg.objective.mask_ratio
        if not 0.0 < ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio must be in (0, 1) for objective.name=mae (the loss is on the "
                              f"hidden patches), got {ratio}")

    @classmethod
    def export_part(cls, state_dict: dict[str, torch.Tensor], full: bool) -> tuple[dict[str, torch.Tensor], str]:
        if full:
            return state_dict, "full"
        prefix = "encoder."
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, "encoder"

    @classmethod
    def adopt(cls, state_dict: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
        if not any(DECODER_RE.match(k) for k in state_dict):
            return None
        if any(k.startswith("encoder.") for k in state_dict):
            return state_dict
        return {k if DECODER_RE.match(k) else "encoder." + k: v for k, v in state_dict.items()}  # the MAE release

    @classmethod
    def rebuild(cls, build: Callable[[int], nn.Module], state_dict: dict[str, torch.Tensor], part: str
                ) -> nn.Module:
        model = build(0)
        return model if part == "full" else model.encoder  # an exported encoder: sin-cos table, [CLS], no head

    @staticmethod
    def encoder(model: nn.Module) -> nn.Module:
        return getattr(model, "encoder", model)

    analysis_section = "mae"

    @classmethod
    def analyze(cls, run: Any, mask_ratio: Optional[float], seed: int, norm_pix_loss: Optional[bool]
                ) -> Optional[dict[str, Any]]:
        """Reconstructions of an MAE with its decoder (mask ratio and norm_pix_loss: the run's unless given); a
        note for an encoder-only export."""
        if run.info["part"] != "full":
            res = {"skipped": "encoder-only export: the decoder is needed (export with --full, or pass the "
                              "checkpoint directory)"}
            run.note("MAE reconstruction skipped: " + res["skipped"])
            return res
        saved, defaults = run.info["objective_cfg"], ObjectiveConfig()
        if mask_ratio is None:
            mask_ratio = saved.get("mask_ratio", defaults.mask_ratio)
        if not 0.0 <= mask_ratio < 1.0:  # outside, tokens_kept goes negative or past L and masks another fraction
            raise ConfigError(f"--mask-ratio must be in [0, 1) (the fraction of patches hidden), got {mask_ratio}")
        npl = norm_pix_loss if norm_pix_loss is not None else saved.get("norm_pix_loss")
        if npl is None:
            npl = defaults.norm_pix_loss
            run.note(f"the file does not record objective.norm_pix_loss; assuming {npl} (override with "
                     f"--norm-pix-loss/--no-norm-pix-loss)")
        run.model.norm_pix_loss = bool(npl)  # the model's own loss in the same target space as the pictures
        rec = reconstruct(run.model, run.x, mask_ratio, npl, seed)
        mse = [float(v) for v in rec["mse"]]
        how = "per-patch mean/var of the original restored" if npl else "pixels predicted directly"
        run.wrote(save_mae_grid(rec["panels"], run.out / "mae_reconstruction.png",
                                f"MAE reconstruction, mask ratio {mask_ratio} (seed {seed}; {how})\n{run.label}",
                                names=run.names, mse=mse, mask_ratio=mask_ratio))
        return {"mask_ratio": mask_ratio, "seed": seed, "norm_pix_loss": bool(npl),
                "masked_mse": dict(zip(run.names, mse)), "model_loss": float(rec["loss"])}

    def block_stacks(self, model: nn.Module) -> list[tuple[str, Any, int]]:
        enc = model.encoder
        patches, npt = enc.patch_embed.num_patches, enc.num_prefix_tokens
        stacks = [("encoder", enc.blocks, tokens_kept(patches, self.cfg.objective.mask_ratio) + npt)]
        if len(model.decoder_blocks):
            stacks.append(("decoder", model.decoder_blocks, patches + npt))
        return stacks

    def outside_blocks_bytes(self, model: nn.Module, stacks: list, batch: int, b: int) -> int:
        enc, dec = stacks[0], stacks[-1]
        patches = model.encoder.patch_embed.num_patches
        out = 2 * batch * enc.tokens * enc.dim * b  # encoder norm: input and output (decoder_embed's input)
        if len(stacks) > 1:
            out += 2 * batch * dec.tokens * dec.dim * b  # decoder norm: input and output (decoder_pred's input)
        out += 8 * batch * patches * model.patch_size ** 2 * model.in_chans  # fp32 target and (pred - target)
        return out + 24 * batch * patches  # ids_shuffle/ids_restore (int64), mask (fp32, twice)

    def build_model(self, num_classes: int = 0) -> nn.Module:
        m, o = self.cfg.model, self.cfg.objective
        if not m.name.startswith("mae_"):
            parse_name(m.name)  # an unknown encoder is named as the user wrote it, not as the mae_ name made from it
        name = m.name if m.name.startswith("mae_") else "mae_" + m.name
        model = create_model(name, norm_pix_loss=o.norm_pix_loss, mask_ratio=o.mask_ratio, **model_kwargs(self.cfg),
                             **model_kwargs(self.cfg, DECODER_KWARGS))
        model.set_grad_checkpointing(m.grad_checkpointing)
        return model

    def flops_per_image(self, model: nn.Module) -> float:
        mae = unwrap(model)  # at the model's own mask ratio (objective.mask_ratio, set at build); frozen parts
        return float(train_flops(mae, mae.flop_parts()))  # (model.freeze) have no backward

    def __call__(self, model: Callable, images: torch.Tensor, labels: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return mae_step(model, images)

    def eval_sums(self, model: Callable, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        loss, _ = self(model, images, labels)
        return {"loss": float(loss) * len(labels)}

    def images_due(self, step: int, last: bool) -> bool:
        every = self.cfg.logging.image_every
        return last or bool(every and step % every == 0)

    @torch.no_grad()
    def visualize(self, model: Callable, module: nn.Module, images: torch.Tensor, step: int) -> Optional[Picture]:
        ratio = module.mask_ratio
        _, pred, mask = model(images)
        return Picture(key="mae_reconstruction", filename=f"mae_step_{step:08d}.png",
                       title=f"{self.cfg.run.name}: step {step}, mask ratio {ratio}",
                       panels=mae_panels(module, images, pred, mask), draw=save_mae_grid)


def mae_step(model: Callable, images: torch.Tensor, labels: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One MAE step at the model's own mask ratio (``objective.mask_ratio`` is stored in the model, once)."""
    loss, _pred, mask = model(images)
    return loss.float(), {"mask_frac": mask.detach().float().mean()}  # a tensor: no host sync per micro-batch


@torch.no_grad()
def reconstruct(model: nn.Module, x: torch.Tensor, mask_ratio: float, norm_pix_loss: bool, seed: int = 0
                ) -> dict[str, torch.Tensor]:
    """Mask and reconstruct normalised images ``x``. Returns the four ``panels`` per image (B, 4, 3, H, W) in
    [0, 1] (original, masked with hidden patches grey, prediction, prediction + visible), per-image ``mse`` on the
    hidden patches (normalised pixel units) and the model's own ``loss``; the panels are the trainer's."""
    torch.manual_seed(seed)
    if x.is_cuda:
        torch.cuda.manual_seed(seed)
    loss, pred, mask = model(x, mask_ratio=mask_ratio)
    pixels = prediction_to_pixels(model, x, pred, norm_pix_loss)
    per_patch = ((pixels - model.patchify(x)) ** 2).mean(dim=-1)
    mse = (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return {"panels": mae_panels(model, x, pred, mask, norm_pix_loss, hidden_fill=0.5), "mse": mse, "loss": loss}


# ----- pictures ------------------------------------------------------------------------------------------------
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
