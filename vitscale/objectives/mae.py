"""Masked-autoencoder pretraining: the model computes its own loss on the masked patches."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from vitscale.logging.images import mae_panels, save_mae_grid
from vitscale.models import create_model
from vitscale.models.flops import forward_flops
from vitscale.objectives.base import Objective, Picture, model_kwargs

# model.<key> -> MAE keyword, on top of the encoder's MODEL_KWARGS.
DECODER_KWARGS = {"decoder_embed_dim": "decoder_embed_dim", "decoder_depth": "decoder_depth",
                  "decoder_num_heads": "decoder_num_heads", "decoder_mlp_ratio": "decoder_mlp_ratio"}


class MAE(Objective):
    name = "mae"

    def build_model(self, num_classes: int = 0) -> nn.Module:
        m, o = self.cfg.model, self.cfg.objective
        name = m.name if m.name.startswith("mae_") else "mae_" + m.name
        model = create_model(name, norm_pix_loss=o.norm_pix_loss, mask_ratio=o.mask_ratio, **model_kwargs(self.cfg),
                             **model_kwargs(self.cfg, DECODER_KWARGS))
        model.set_grad_checkpointing(m.grad_checkpointing)
        return model

    def flops_per_image(self, model: nn.Module) -> float:
        return 3 * forward_flops(model, mask_ratio=self.cfg.objective.mask_ratio)

    def __call__(self, model: Callable, images: torch.Tensor, labels: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return mae_step(model, images, mask_ratio=self.cfg.objective.mask_ratio)

    def eval_sums(self, model: Callable, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        loss, _ = self(model, images, labels)
        return {"loss": float(loss) * len(labels)}

    def images_due(self, step: int, last: bool) -> bool:
        every = self.cfg.logging.image_every
        return last or bool(every and step % every == 0)

    @torch.no_grad()
    def visualize(self, model: Callable, module: nn.Module, images: torch.Tensor, step: int) -> Optional[Picture]:
        ratio = self.cfg.objective.mask_ratio
        _, pred, mask = model(images, mask_ratio=ratio)
        return Picture(key="mae_reconstruction", filename=f"mae_step_{step:08d}.png",
                       title=f"{self.cfg.run.name}: step {step}, mask ratio {ratio}",
                       panels=mae_panels(module, images, pred, mask), draw=save_mae_grid)


def mae_step(model: Callable, images: torch.Tensor, labels: Optional[torch.Tensor] = None, mask_ratio: float = 0.75
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, _pred, mask = model(images, mask_ratio=mask_ratio)
    return loss.float(), {"mask_frac": mask.detach().float().mean()}  # a tensor: no host sync per micro-batch
