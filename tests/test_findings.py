"""Numeric facts the paper reproductions (docs/reproductions.md) rely on."""
import torch

from vitscale.models import create_model


def _permute_patches(img: torch.Tensor, patch: int, order: torch.Tensor) -> torch.Tensor:
    b, c, h, w = img.shape
    gh, gw = h // patch, w // patch
    tiles = img.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, patch, patch)
    tiles = tiles[:, order]
    return tiles.reshape(b, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def test_without_position_embedding_a_vit_cannot_see_patch_order():
    """ViT paper, Table 8: with no position embedding the model is a bag of patches."""
    torch.manual_seed(0)
    img = torch.randn(2, 3, 32, 32)
    order = torch.randperm(16)
    for pos, invariant in (("none", True), ("learn", False), ("sincos", False)):
        model = create_model("vit_tiny_patch8", img_size=32, depth=2, num_classes=5, pos_embed=pos).eval()
        if pos == "learn":
            torch.nn.init.normal_(model.pos_embed, std=0.5)  # random learned embeddings, as after training
        with torch.no_grad():
            diff = (model(img) - model(_permute_patches(img, 8, order))).abs().max().item()
        assert (diff < 1e-4) == invariant, (pos, diff)
