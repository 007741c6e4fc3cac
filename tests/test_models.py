"""Model package: timm parity, MAE behaviour, checkpointing, registry, FLOPs, position embeddings.

Tiny widths and images so the whole file runs in seconds on 2 CPU cores.
"""
from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import f32_approx
from vitscale.models import MaskedAutoencoderViT, VisionTransformer, create_model, list_models
from vitscale.models.flops import forward_flops
from vitscale.models.registry import count_params
from vitscale.models.layers import Attention, DropPath
from vitscale.models.pos_embed import resize_pos_embed, sincos_2d

import timm.models.vision_transformer as timm_vit  # noqa: E402  (timm is in the [test] extra: never skip)

TINY = dict(embed_dim=64, depth=2, num_heads=4)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----- timm parity ---------------------------------------------------------------------------------------------
PARITY = [
    dict(img_size=32, patch_size=8),
    dict(img_size=64, patch_size=16, global_pool="avg"),
    dict(img_size=48, patch_size=8, global_pool="avg", class_token=False),
    dict(img_size=32, patch_size=8, init_values=0.1, mlp_ratio=2.0),
    dict(img_size=48, patch_size=16, num_classes=0, qkv_bias=False),
]


@pytest.mark.parametrize("cfg", PARITY, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_timm_parity_both_directions(cfg):
    cfg = {**TINY, "num_classes": 7, **cfg}
    torch.manual_seed(0)
    ours = VisionTransformer(**cfg).eval()
    theirs = timm_vit.VisionTransformer(**cfg).eval()
    x = torch.randn(2, 3, cfg["img_size"], cfg["img_size"])

    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)  # ours -> timm
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
        assert (ours.forward_features(x) - theirs.forward_features(x)).abs().max() <= 1e-5

    torch.manual_seed(1)
    theirs = timm_vit.VisionTransformer(**cfg).eval()  # fresh timm weights -> ours
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        out = ours(x)
        assert (out - theirs(x)).abs().max() <= 1e-5
        assert (ours.forward_head(ours.forward_features(x), pre_logits=True)
                - theirs.forward_head(theirs.forward_features(x), pre_logits=True)).abs().max() <= 1e-5
    assert out.shape == ((2, 7) if cfg["num_classes"] else (2, 64))


@pytest.mark.parametrize("cfg", [dict(qk_norm=True, reg_tokens=4),
                                 dict(global_pool="avg", class_token=False, reg_tokens=2, qk_norm=True)],
                         ids=["cls-reg4-qknorm", "avg-nocls-reg2-qknorm"])
def test_qk_norm_and_registers_match_timm_both_ways(cfg):
    """Same keys and shapes as timm's ViT (reg_token, attn.q_norm/k_norm, one pos_embed row per prefix token), and
    the same outputs both ways. Every tensor is perturbed first: registers start at std 1e-6 and the q/k norms at
    identity, where a register or norm that is ignored or misplaced would still agree."""
    cfg = {**TINY, "img_size": 32, "patch_size": 8, "num_classes": 7, **cfg}
    torch.manual_seed(0)
    ours = VisionTransformer(**cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    theirs = timm_vit.VisionTransformer(**cfg).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.reg_token.shape == (1, cfg["reg_tokens"], 64)
    assert ours.pos_embed.shape[1] == 16 + ours.num_prefix_tokens == 16 + theirs.num_prefix_tokens
    x = torch.randn(2, 3, 32, 32)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # ours -> timm
    with torch.no_grad():
        # outputs are O(1) after the perturbation; 1e-5 is float32 rounding through two blocks, far below the
        # O(0.1) change a dropped register or q/k norm makes (checked below)
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
        assert (ours.forward_features(x) - theirs.forward_features(x)).abs().max() <= 1e-5
        without_regs = ours(x)
        ours.reg_token.zero_()
        assert (ours(x) - without_regs).abs().max() > 1e-2  # the registers take part
    torch.manual_seed(1)
    theirs = timm_vit.VisionTransformer(**cfg).eval()  # timm -> ours
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
        assert (ours.forward_head(ours.forward_features(x), pre_logits=True)
                - theirs.forward_head(theirs.forward_features(x), pre_logits=True)).abs().max() <= 1e-5
        assert ours.get_attention_maps(x)[0].shape[-2:] == (16 + ours.num_prefix_tokens,) * 2
    assert {"reg_token", "cls_token", "pos_embed"} <= ours.no_weight_decay()


def test_create_model_takes_qk_norm_and_registers():
    m = create_model("vit_micro_patch8", img_size=32, qk_norm=True, reg_tokens=4)
    assert m.num_prefix_tokens == 5 and m.num_reg_tokens == 4
    assert isinstance(m.blocks[0].attn.q_norm, torch.nn.LayerNorm) and m.blocks[0].attn.q_norm.eps == 1e-6
    plain = create_model("vit_micro_patch8", img_size=32)
    assert plain.reg_token is None and isinstance(plain.blocks[0].attn.k_norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="reg_tokens must be >= 0"):
        create_model("vit_micro_patch8", img_size=32, reg_tokens=-1)


def test_mae_never_masks_register_tokens():
    """The encoder sees [CLS] + all 4 registers + the visible patches; at mask ratio 0 its prefix outputs equal the
    plain encoder's (registers carry their own position rows), and the decoder predicts patches only."""
    torch.manual_seed(0)
    m = create_model("mae_vit_micro_patch8", img_size=32, reg_tokens=4, qk_norm=True, **TINY).eval()
    with torch.no_grad():
        m.encoder.reg_token.normal_()  # far from the near-zero init, so a dropped register would show
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        latent, mask, ids_restore = m.forward_encoder(x, 0.75)
        assert latent.shape[1] == 1 + 4 + 4 and mask.shape == (3, 16)  # 16 patches, 4 kept, 5 prefix tokens
        assert torch.equal(mask.sum(dim=1), torch.full((3,), 12.0))  # only patches are masked: 12 of 16
        loss, pred, mask = m(x)
        assert pred.shape == (3, 16, 8 * 8 * 3) and torch.isfinite(loss)
        latent, mask, ids_restore = m.forward_encoder(x, 0.0)
        full = m.encoder.forward_features(x)
    # fp32 through two blocks on O(1) values: 1e-5 is rounding, far below any difference in which tokens attend
    assert (latent[:, :5] - full[:, :5]).abs().max() <= 1e-5
    unshuffled = torch.gather(latent[:, 5:], 1, ids_restore[..., None].expand(-1, -1, 64))
    assert (unshuffled - full[:, 5:]).abs().max() <= 1e-5


def test_fc_norm_rule_follows_timm():
    tok = VisionTransformer(img_size=32, patch_size=8, **TINY)
    avg = VisionTransformer(img_size=32, patch_size=8, global_pool="avg", **TINY)
    assert isinstance(tok.norm, torch.nn.LayerNorm) and isinstance(tok.fc_norm, torch.nn.Identity)
    assert isinstance(avg.norm, torch.nn.Identity) and isinstance(avg.fc_norm, torch.nn.LayerNorm)


def test_construction_is_a_pure_function_of_the_seed():
    def build(seed):
        torch.manual_seed(seed)
        return create_model("vit_micro_patch8", img_size=32, init_values=0.1).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_init_scheme():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=1, num_heads=4, num_classes=10)
    for name in ("blocks.0.attn.qkv.bias", "blocks.0.mlp.fc1.bias", "head.bias", "patch_embed.proj.bias"):
        assert torch.count_nonzero(m.get_parameter(name)) == 0, name
    w = m.blocks[0].mlp.fc1.weight  # xavier-uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
    bound = (6 / sum(w.shape)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    pw = m.patch_embed.proj.weight.flatten(1)  # patch projection initialised like a Linear
    assert pw.abs().max() <= (6 / sum(pw.shape)) ** 0.5
    assert 0.015 < m.pos_embed.std() < 0.025 and m.pos_embed.requires_grad


# ----- attention maps ------------------------------------------------------------------------------------------
def test_attention_return_attn_path_matches_sdpa():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).eval()
    x = torch.randn(2, 9, 32)
    out, probs = attn(x, return_attn=True)
    assert probs.shape == (2, 4, 9, 9)
    assert torch.allclose(attn(x), out, atol=1e-6)


def test_attention_maps():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, init_values=0.5, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = m.get_attention_maps(x)
        assert len(maps) == 2 and all(a.shape == (2, 4, 17, 17) for a in maps)
        for a in maps:
            assert torch.allclose(a.sum(-1), torch.ones(2, 4, 17), atol=1e-5) and (a >= 0).all()
        # The forward output equals the output computed along the return_attn path.
        h = m._embed(x)
        for blk in m.blocks:
            h, _ = blk(h, return_attn=True)
        via_attn = m.forward_head(m.norm(h))
        assert (m(x) - via_attn).abs().max() <= 1e-5


def test_drop_path():
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}  # whole samples dropped, the rest rescaled
    assert (per_sample.std(1) == 0).all() and 0 < (per_sample[:, 0] == 0).sum() < 64


# ----- gradient checkpointing ----------------------------------------------------------------------------------
def _vit_grads(checkpointing: bool, model_state) -> tuple[dict, int]:
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=5, drop_path_rate=0.2, **TINY)
    m.load_state_dict(model_state)
    m.set_grad_checkpointing(checkpointing)
    m.train()
    torch.manual_seed(123)
    x = torch.randn(4, 3, 32, 32)
    with mock.patch("torch.utils.checkpoint.checkpoint", wraps=torch.utils.checkpoint.checkpoint) as ck:
        m(x).square().mean().backward()
    return _grads(m), ck.call_count


def test_grad_checkpointing_vit():
    torch.manual_seed(0)
    state = VisionTransformer(img_size=32, patch_size=8, num_classes=5, drop_path_rate=0.2, **TINY).state_dict()
    ref, n_ref = _vit_grads(False, state)
    got, n_got = _vit_grads(True, state)
    assert n_ref == 0 and n_got == 2  # one checkpoint per block
    assert ref.keys() == got.keys() and len(ref) == len(state)
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6, rtol=1e-5), k


def test_grad_checkpointing_only_while_training():
    m = VisionTransformer(img_size=32, patch_size=8, **TINY)
    m.set_grad_checkpointing(True)
    m.eval()
    with mock.patch("torch.utils.checkpoint.checkpoint", wraps=torch.utils.checkpoint.checkpoint) as ck:
        m(torch.randn(1, 3, 32, 32)).sum().backward()
    assert ck.call_count == 0


def test_grad_checkpointing_mae():
    torch.manual_seed(0)
    kw = dict(img_size=32, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
    m = create_model("mae_vit_micro_patch8", **kw)
    imgs = torch.randn(3, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        m.zero_grad(set_to_none=True)
        m.set_grad_checkpointing(ckpt)
        torch.manual_seed(7)  # same mask noise both times
        with mock.patch("torch.utils.checkpoint.checkpoint", wraps=torch.utils.checkpoint.checkpoint) as ck:
            loss, _, _ = m(imgs)
            loss.backward()
        assert ck.call_count == (4 + 2 if ckpt else 0)  # encoder + decoder blocks
        grads.append(_grads(m))
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5), k


# ----- MAE -----------------------------------------------------------------------------------------------------
def _tiny_mae(**kw) -> MaskedAutoencoderViT:
    return create_model("mae_vit_micro_patch8", **{**dict(img_size=32, embed_dim=64, depth=2, num_heads=4,
                                                          decoder_embed_dim=32, decoder_depth=1,
                                                          decoder_num_heads=4), **kw})


def test_mae_shapes_and_mask():
    torch.manual_seed(0)
    m = _tiny_mae(mask_ratio=0.75)
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask = m(imgs)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (3, 16, 8 * 8 * 3) and mask.shape == (3, 16)
    assert torch.equal(mask.sum(1), torch.full((3,), 12.0))  # 16 * 0.75 masked per sample
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    _, _, mask2 = m(imgs, mask_ratio=0.5)
    assert torch.equal(mask2.sum(1), torch.full((3,), 8.0))
    assert not torch.equal(mask[0], mask[1]) or not torch.equal(mask[1], mask[2])  # per-sample masks


def test_mae_random_masking_follows_global_rng():
    m = _tiny_mae()
    x = torch.randn(2, 16, 64)
    torch.manual_seed(3)
    a = m.random_masking(x, 0.75)
    torch.manual_seed(3)
    b = m.random_masking(x, 0.75)
    c = m.random_masking(x, 0.75)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1])
    # the kept tokens are exactly the unmasked ones, in the order ids_restore undoes
    visible, mask, ids_restore = a
    kept = x[0][mask[0] == 0]
    assert sorted(kept[:, 0].tolist()) == sorted(visible[0][:, 0].tolist())


def test_mae_patchify_roundtrip():
    m = _tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    patches = m.patchify(imgs)
    assert patches.shape == (2, 16, 192)
    assert torch.equal(m.unpatchify(patches), imgs)
    # patch 0 is the top-left 8x8 block, (row, col, channel) order
    assert torch.equal(patches[0, 0].reshape(8, 8, 3), imgs[0, :, :8, :8].permute(1, 2, 0))
    assert torch.equal(patches[0, 1].reshape(8, 8, 3), imgs[0, :, :8, 8:16].permute(1, 2, 0))


def test_mae_encoder_sees_only_visible_tokens():
    torch.manual_seed(0)
    m = _tiny_mae(mask_ratio=0.75)
    seen = []
    m.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    dec_seen = []
    m.decoder_blocks[0].register_forward_hook(lambda mod, inp, out: dec_seen.append(inp[0].shape[1]))
    m(torch.randn(2, 3, 32, 32))
    assert seen == [4 + 1]  # 16 patches, 4 visible, + [CLS]
    assert dec_seen == [16 + 1]


def test_mae_encoder_exports_to_timm():
    torch.manual_seed(0)
    m = _tiny_mae().eval()
    timm_enc = timm_vit.VisionTransformer(img_size=32, patch_size=8, num_classes=0, **TINY).eval()
    timm_enc.load_state_dict(m.encoder.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (timm_enc.forward_features(x) - m.encoder.forward_features(x)).abs().max() <= 1e-5
    # mask_ratio 0: the MAE encoder path equals the plain encoder up to token order
    with torch.no_grad():
        latent, mask, ids_restore = m.forward_encoder(x, 0.0)
    full = m.encoder.forward_features(x)
    assert mask.sum() == 0
    unshuffled = torch.gather(latent[:, 1:], 1, ids_restore[..., None].expand(-1, -1, 64))
    assert (unshuffled - full[:, 1:]).abs().max() <= 1e-5 and (latent[:, 0] - full[:, 0]).abs().max() <= 1e-5


def test_mae_no_weight_decay_and_frozen_tables():
    m = _tiny_mae()
    names = dict(m.named_parameters())
    assert m.no_weight_decay() <= set(names)
    assert {"encoder.pos_embed", "encoder.cls_token", "mask_token", "decoder_pos_embed"} == m.no_weight_decay()
    assert not m.encoder.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    assert torch.allclose(m.decoder_pos_embed[0], sincos_2d(32, 4, num_prefix_tokens=1))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_learns_a_real_image(norm_pix_loss):
    import skimage.data as skdata
    img = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).float()[None] / 255.0
    img = F.interpolate(img, size=(32, 32), mode="area")
    imgs = (img - img.mean()) / img.std()
    imgs = torch.cat([imgs, imgs.flip(-1)])
    torch.manual_seed(0)
    m = _tiny_mae(mask_ratio=0.5, norm_pix_loss=norm_pix_loss)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(100)  # fixed mask: the loss must fall on a fixed problem
        loss, _, _ = m(imgs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_mae_loss_only_on_masked_patches():
    m = _tiny_mae(norm_pix_loss=False)  # raw pixel targets: the loss below is in pixel units
    imgs = torch.randn(1, 3, 32, 32)
    target = m.patchify(imgs)
    mask = torch.zeros(1, 16)
    mask[0, :4] = 1
    pred = target.clone()
    pred[0, 4:] += 5.0  # wrong only on visible patches: no loss
    assert m.forward_loss(imgs, pred, mask) == 0
    pred[0, 0] += 2.0
    assert torch.isclose(m.forward_loss(imgs, pred, mask), torch.tensor(4.0 / 4))


# ----- registry ------------------------------------------------------------------------------------------------
def test_every_listed_name_resolves():
    names = list_models()
    assert "vit_large_patch16" in names and "mae_vit_huge_patch14" in names
    with torch.device("meta"):
        for name in names:
            m = create_model(name)
            assert isinstance(m, MaskedAutoencoderViT if name.startswith("mae_") else VisionTransformer), name


@pytest.mark.parametrize("short,long", [("L/16", "vit_large_patch16"), ("Ti/16", "vit_tiny_patch16"),
                                        ("H/14", "vit_huge_patch14"), ("ViT-B/32", "vit_base_patch32"),
                                        ("g/14", "vit_giant_patch14"), ("G/14", "vit_gigantic_patch14"),
                                        ("mae_L/16", "mae_vit_large_patch16")])
def test_short_names(short, long):
    with torch.device("meta"):
        a, b = create_model(short), create_model(long)
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]


def test_any_patch_size_and_none_kwargs():
    m = create_model("vit_tiny_patch4", img_size=32, embed_dim=None, depth=2, num_heads=None, patch_size=None)
    assert m.embed_dim == 192 and len(m.blocks) == 2 and m.patch_embed.grid_size == (8, 8)
    m = create_model("vit_micro_patch16", img_size=32, patch_size=8)  # explicit override beats the name
    assert m.patch_embed.patch_size == (8, 8)
    mae = create_model("mae_vit_micro_patch4", img_size=32, decoder_depth=1, norm_pix_loss=True, mask_ratio=0.6,
                       decoder_embed_dim=None, drop_path_rate=0.1)
    assert len(mae.decoder_blocks) == 1 and mae.norm_pix_loss and mae.mask_ratio == 0.6
    assert mae.decoder_embed_dim == 128 and mae.encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    with torch.device("meta"):
        assert create_model("mae_vit_large_patch16").decoder_embed_dim == 512


def test_bad_names():
    with pytest.raises(ValueError, match="vit_lage_patch16.*vit_large_patch16"):
        create_model("vit_lage_patch16")
    for bad in ("vit_large", "X/16", "resnet50", "vit_large_patch0"):
        with pytest.raises(ValueError) as e:
            create_model(bad)
        assert bad in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="mae_"):
        create_model("vit_micro_patch4", mask_ratio=0.5)


@pytest.mark.parametrize("name,millions", [("vit_base_patch16", 86.6), ("vit_large_patch16", 304.3),
                                           ("vit_huge_patch14", 632.0), ("vit_giant_patch14", 1012.6),
                                           ("vit_gigantic_patch14", 1844.4)])
def test_param_counts_on_meta(name, millions):
    n = count_params(name)
    assert abs(n / 1e6 - millions) / millions < 0.01, n
    with torch.device("meta"):
        ref = sum(p.numel() for p in timm_vit.VisionTransformer(**_timm_args(name)).parameters())
    assert n == ref


def _timm_args(name):
    from vitscale.models.registry import parse_name
    _, _, args = parse_name(name)
    return args


# ----- FLOPs ---------------------------------------------------------------------------------------------------
def counted_flops(model, x) -> int:
    """FLOPs torch's counter sees. The math SDPA backend runs attention as bmm's, which it counts; the fused CPU
    flash kernel is not registered with FlopCounterMode (torch 2.14), so under it attention would be missed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("name,kw", [
    ("vit_micro_patch8", dict(img_size=32, num_classes=10)),
    ("vit_micro_patch4", dict(img_size=32, global_pool="avg", class_token=False, num_classes=0)),
    ("vit_tiny_patch16", dict(img_size=48, depth=2, mlp_ratio=3.0)),
    ("mae_vit_micro_patch8", dict(img_size=64, mask_ratio=0.75)),
    ("mae_vit_micro_patch4", dict(img_size=32, mask_ratio=0.6, decoder_embed_dim=64, decoder_depth=3)),
])
def test_flops_match_flop_counter(name, kw):
    torch.manual_seed(0)
    m = create_model(name, **kw).eval()
    x = torch.randn(1, 3, kw["img_size"], kw["img_size"])
    measured = counted_flops(m, x)
    assert abs(forward_flops(m) - measured) / measured < 0.02, (forward_flops(m), measured)


def test_flops_scale():
    with torch.device("meta"):
        vit = create_model("vit_base_patch16")
        mae = create_model("mae_vit_large_patch16")
    assert abs(forward_flops(vit) / 1e9 - 2 * 17.56) / 35.1 < 0.02  # ViT-B/16 at 224: 17.6 GMACs
    assert forward_flops(mae, mask_ratio=0.75) < forward_flops(mae, mask_ratio=0.0)
    assert forward_flops(vit, img_size=448) > 4 * forward_flops(vit)
    with pytest.raises(ValueError):
        forward_flops(vit, mask_ratio=0.75)


# ----- position embeddings -------------------------------------------------------------------------------------
def test_resize_pos_embed_same_grid_is_identity_and_matches_timm():
    from timm.layers import resample_abs_pos_embed
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16, 32)
    assert torch.allclose(resize_pos_embed(pos, 4, num_prefix_tokens=1), pos, atol=1e-6)
    for new in (6, 3, (5, 7)):
        ours = resize_pos_embed(pos, new, num_prefix_tokens=1)
        g = new if isinstance(new, tuple) else (new, new)
        ref = resample_abs_pos_embed(pos, list(g), num_prefix_tokens=1)
        assert ours.shape == (1, 1 + g[0] * g[1], 32) and torch.equal(ours[:, :1], pos[:, :1])
        assert torch.allclose(ours, ref, atol=1e-5)


def test_model_set_input_size():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, **TINY).eval()
    orig = m.pos_embed.detach().clone()
    m.set_input_size(48)
    assert m.pos_embed.shape == (1, 1 + 36, 64) and m.patch_embed.grid_size == (6, 6)
    assert torch.equal(m.pos_embed[:, :1], orig[:, :1])  # class token kept
    assert m(torch.randn(1, 3, 48, 48)).shape == (1, 1000)
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, 32, 32))  # strict size by default
    m2 = VisionTransformer(img_size=32, patch_size=8, **TINY)
    m2.load_state_dict(m.state_dict() | {"pos_embed": orig})
    m2.set_input_size(32)  # same grid: the original embedding back
    assert torch.allclose(m2.pos_embed, orig, atol=1e-6)
    s = VisionTransformer(img_size=32, patch_size=8, pos_embed="sincos", **TINY)
    s.set_input_size(64)
    assert torch.allclose(s.pos_embed[0], sincos_2d(64, 8, num_prefix_tokens=1)) and not s.pos_embed.requires_grad


def test_dynamic_img_size():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, dynamic_img_size=True, **TINY).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 48, 64)).shape == (2, 1000)
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 3, 36, 32))


def test_sincos_table():
    t = sincos_2d(16, (3, 5), num_prefix_tokens=1)
    assert t.shape == (16, 16) and torch.equal(t[0], torch.zeros(16))
    assert len({tuple(r.tolist()) for r in t[1:]}) == 15  # every position distinct
    assert torch.allclose(t[1:, :8].reshape(3, 5, 8)[0], t[1:, :8].reshape(3, 5, 8)[2])  # x half ignores rows


# ----- hybrid --------------------------------------------------------------------------------------------------
def test_hybrid_matches_timm_and_counts_flops():
    from functools import partial

    from timm.models.vision_transformer_hybrid import HybridEmbed as TimmHybridEmbed
    from timm.models.vision_transformer_hybrid import _resnetv2
    torch.manual_seed(0)
    ours = VisionTransformer(img_size=64, patch_size=16, num_classes=3, hybrid_layers=(1, 1, 1), **TINY).eval()
    assert all(torch.count_nonzero(b.norm3.weight) == 0 for s in ours.patch_embed.backbone.stages for b in s.blocks)
    theirs = timm_vit.VisionTransformer(img_size=64, patch_size=1, num_classes=3, **TINY, embed_layer=partial(
        TimmHybridEmbed, backbone=_resnetv2((1, 1, 1), padding_same=False))).eval()
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in ours.state_dict().items()}  # un-zero the GN scales
    ours.load_state_dict(state)
    theirs.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
    measured = counted_flops(ours, x[:1])
    assert abs(forward_flops(ours) - measured) / measured < 0.02


def test_hybrid_registry_and_mae():
    with torch.device("meta"):
        m = create_model("vit_hybrid_r50_base_patch16")
    assert m.patch_embed.backbone.layers == (3, 4, 9) and m.patch_embed.grid_size == (14, 14)
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 98.7) < 1.0  # timm vit_base_r50_s16_224: 98.7M
    with pytest.raises(ValueError, match="stride 16"):
        create_model("vit_hybrid_r50_base_patch32")
    torch.manual_seed(0)
    mae = create_model("mae_vit_micro_patch16", img_size=32, depth=1, hybrid_layers=(1, 1, 1))
    loss, pred, mask = mae(torch.randn(2, 3, 32, 32))
    assert pred.shape == (2, 4, 16 * 16 * 3) and mask.sum() == 2 * 3 and torch.isfinite(loss)


def test_mae_bf16_mask_and_loss_in_fp32():
    torch.manual_seed(0)
    m = _tiny_mae().to(torch.bfloat16)
    loss, pred, mask = m(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert pred.dtype == torch.bfloat16 and mask.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.isfinite(loss) and mask.sum() == 24


@functools.lru_cache(maxsize=None, typed=True)  # True == 1 otherwise
def _mae_losses(setting, steps=3):
    torch.manual_seed(0)
    m = create_model("mae_vit_micro_patch8", img_size=32, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
                     drop_path_rate=0.1)
    m.set_grad_checkpointing(setting)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    imgs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    losses = []
    with mock.patch("torch.utils.checkpoint.checkpoint", wraps=torch.utils.checkpoint.checkpoint) as ck:
        for step in range(steps):
            torch.manual_seed(10 + step)  # masks and drop-path: the same for every setting
            loss, _, _ = m(imgs)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return tuple(losses), ck.call_count // steps


@pytest.mark.parametrize("setting, recomputed", [(False, 0), (0, 0), (1, 1), (4, 4), (5, 5), (True, 6), (99, 6)])
def test_selective_checkpointing_first_n_blocks_same_losses(setting, recomputed):
    """model.grad_checkpointing=N recomputes the first N blocks in forward order (4 encoder, then 2 decoder
    blocks); every setting trains to the same losses, bit for bit."""
    losses, calls = _mae_losses(setting)
    assert calls == recomputed
    assert losses == _mae_losses(False)[0]


def test_selective_checkpointing_vit_and_bad_value():
    m = VisionTransformer(img_size=32, patch_size=8, **TINY)
    m.set_grad_checkpointing(1)
    assert (m.grad_checkpointing, m.checkpoint_blocks) == (True, 1)
    with mock.patch("torch.utils.checkpoint.checkpoint", wraps=torch.utils.checkpoint.checkpoint) as ck:
        m(torch.randn(1, 3, 32, 32)).sum().backward()
    assert ck.call_count == 1
    with pytest.raises(ValueError, match="number of blocks >= 0"):
        m.set_grad_checkpointing(-1)


def test_objectives_own_model_flops_metrics_evaluation_and_pictures():
    """What differs between objectives lives in the objective: metrics come back as 0-d tensors (synced by the
    loop on log steps only), held-out sums match a direct computation, MAE FLOPs count only visible tokens."""
    from pathlib import Path

    from vitscale.config.load import load_config
    from vitscale.objectives import objective_for

    root = Path(__file__).resolve().parents[1]
    tiny = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2"]
    sup = objective_for(load_config(root / "configs/demo.yaml", tiny))
    torch.manual_seed(0)
    model = sup.build_model(10).eval()
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    loss, metrics = sup(model, images, labels)
    logits = model(images)
    assert torch.is_tensor(metrics["acc"]) and metrics["acc"].dim() == 0
    assert metrics["acc"].item() == (logits.argmax(-1) == labels).float().mean().item()
    sums = sup.eval_sums(model, images, labels)
    assert sums["top1"] == int((logits.argmax(-1) == labels).sum())
    assert sums["top5"] == int((logits.topk(5, -1).indices == labels[:, None]).any(-1).sum()) >= sums["top1"]
    ref = F.cross_entropy(logits, labels, reduction="sum").item()
    assert sums["loss"] == f32_approx(ref, scale=ref, terms=8)  # 8 float32 losses summed, maybe in another order
    assert sup.flops_per_image(model) == 3 * forward_flops(model) and not sup.images_due(300, True)

    mae = objective_for(load_config(root / "configs/demo_mae.yaml", [*tiny, "logging.image_every=50"]))
    net = mae.build_model(0)
    loss, metrics = mae(net, torch.randn(2, 3, 64, 64))
    assert metrics["mask_frac"].dim() == 0 and metrics["mask_frac"].item() == 0.75  # 48 of 64 patches
    assert mae.flops_per_image(net) == 3 * forward_flops(net, mask_ratio=0.75) < 3 * forward_flops(net, mask_ratio=0)
    assert [s for s in range(1, 121) if mae.images_due(s, s == 120)] == [50, 100, 120]
    picture = mae.visualize(net, net, torch.randn(2, 3, 64, 64), step=50)
    assert picture.filename == "mae_step_00000050.png" and tuple(picture.panels.shape) == (2, 4, 3, 64, 64)
