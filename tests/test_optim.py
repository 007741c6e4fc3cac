"""Parameter groups and the LR schedule."""
import math

import pytest
import torch

from vitscale.optim import lr_at, param_groups, peak_lr


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
                                           for _ in range(3)])
        self.head = torch.nn.Linear(8, 2)

    def no_weight_decay(self):
        return {"cls_token", "pos_embed"}


def _decay_of(groups, param):
    return next(g["weight_decay"] for g in groups if any(p is param for p in g["params"]))


def test_no_decay_on_norms_biases_pos_and_tokens():
    m = Toy()
    groups = param_groups(m, weight_decay=0.05)
    assert _decay_of(groups, m.blocks[0][1].weight) == 0.05
    assert _decay_of(groups, m.head.weight) == 0.05
    for p in [m.cls_token, m.pos_embed, m.blocks[0][0].weight, m.blocks[0][1].bias, m.head.bias]:
        assert _decay_of(groups, p) == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_a_wrapper_model_needs_not_repeat_its_encoders_no_decay_names():
    """An objective's model wrapping a ViT as ``encoder`` without its own no_weight_decay(): the encoder's position
    table and [CLS] token were put in the decay group."""
    from vitscale.models import create_model

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = create_model("vit_micro_patch4", img_size=16, num_classes=0)
            self.decoder = torch.nn.Linear(self.encoder.embed_dim, 48)

    m = Wrapper()
    groups = param_groups(m, weight_decay=0.05)
    assert _decay_of(groups, m.encoder.pos_embed) == 0.0 and _decay_of(groups, m.encoder.cls_token) == 0.0
    assert _decay_of(groups, m.decoder.weight) == 0.05
    mae = create_model("mae_vit_micro_patch4", img_size=16)  # names its encoder's itself (its sin-cos table is fixed)
    assert {id(p) for g in param_groups(mae, 0.05) if g["weight_decay"] == 0.0 for p in g["params"]} >= \
        {id(mae.encoder.cls_token), id(mae.mask_token)}


def test_decay_follows_the_real_shape_of_zero3_partitioned_params():
    """Under ZeRO-3 each tensor is a flat (often empty) partition; DeepSpeed keeps the real shape in ds_shape.
    Grouping by the tensor's own ndim would silently drop weight decay from every weight matrix."""
    m = Toy()
    for p in m.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)  # what zero.Init leaves on a rank
    groups = param_groups(m, weight_decay=0.05)
    assert _decay_of(groups, m.blocks[0][1].weight) == 0.05 and _decay_of(groups, m.head.weight) == 0.05
    assert _decay_of(groups, m.blocks[0][0].weight) == 0.0 and _decay_of(groups, m.pos_embed) == 0.0


def test_layer_decay_scales_earlier_layers_down():
    m = Toy()
    groups = param_groups(m, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(m.head.weight)] == 1.0
    assert scale[id(m.blocks[2][1].weight)] == 0.5
    assert scale[id(m.blocks[0][1].weight)] == 0.125
    assert scale[id(m.pos_embed)] == 0.0625


def test_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, warmup=10, total=110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warmup
    assert lrs[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert lr_at(110, 1.0, 10, 110, min_lr=0.01) == pytest.approx(0.01)


def test_warmup_then_linear_decay():
    """optim.schedule=linear: the ViT paper's pretraining schedule (its Table 3: "linear" LR decay)."""
    lrs = [lr_at(s, 1.0, warmup=10, total=110, schedule="linear") for s in range(111)]
    assert lrs[9] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5) and lrs[110] == pytest.approx(0.0)
    assert lrs[35] == pytest.approx(0.75) and lrs[35] != lr_at(35, 1.0, 10, 110)  # not the cosine's 0.854
    assert lr_at(60, 1.0, 10, 110, min_lr=0.2, schedule="linear") == pytest.approx(0.6)


def test_blr_scaling_rule():
    assert peak_lr(None, 1.5e-4, 4096) == pytest.approx(2.4e-3)  # the MAE paper's ViT-L recipe
    assert peak_lr(1e-3, 1.5e-4, 4096) == 1e-3
