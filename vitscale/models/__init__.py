"""Models: timm-compatible ViTs, the MAE wrapper, a name registry and analytic FLOPs.

    from vitscale.models import create_model
    model = create_model("vit_large_patch16", num_classes=1000)      # or "L/16"
    mae = create_model("mae_vit_huge_patch14", norm_pix_loss=True)
"""
from vitscale.models.mae import MaskedAutoencoderViT
from vitscale.models.registry import VARIANTS, create_model, list_models, parse_name
from vitscale.models.vit import VisionTransformer

__all__ = ["MaskedAutoencoderViT", "VARIANTS", "VisionTransformer", "create_model", "list_models", "parse_name"]
