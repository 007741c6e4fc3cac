"""The MAE's token count and its model names, as the user writes them."""
import pytest

from conftest import DEMO
from vitscale.config.load import load_config
from vitscale.models.mae import tokens_kept
from vitscale.objectives import build_model


def test_tokens_kept_floors_the_ratio_as_written():
    """100 patches at mask ratio 0.9 keep 10 (in floats 100 x (1 - 0.9) = 9.999999999999998, and int() gave 9);
    the 224-px counts are unchanged: 196 patches keep 49 at 0.75, 19 at 0.9 (19.6), 78 at 0.6; 256 keep 64."""
    assert tokens_kept(100, 0.9) == 10 and tokens_kept(10, 0.7) == 3 and tokens_kept(1000, 0.3) == 700
    assert [tokens_kept(196, r) for r in (0.75, 0.9, 0.6, 0.5)] == [49, 19, 78, 98]
    assert tokens_kept(256, 0.75) == 64 and tokens_kept(196, 0.0) == 196 and tokens_kept(196, 0.999) == 0
    # every ratio in hundredths gives the paper's count on ViT grids at 224 px (14x14, 16x16) and 448 px (28x28)
    for L in (196, 256, 784):
        assert all(tokens_kept(L, r / 100) == int(L * (1 - r / 100)) for r in range(100))


def test_an_unknown_mae_encoder_is_named_as_the_user_wrote_it():
    """objective.name=mae with model.name=vit_foo_patch16: the error names 'vit_foo_patch16' (what the config says)
    with close ViT names, not the 'mae_vit_foo_patch16' made from it."""
    cfg = load_config(DEMO, ["objective.name=mae", "model.name=vit_foo_patch16"])
    with pytest.raises(ValueError, match=r"unknown model name 'vit_foo_patch16'; did you mean vit_") as e:
        build_model(cfg, 0)
    assert "mae_" not in str(e.value)
