"""vitscale analyze: numbers on constructed cases (expected values computed independently, by brute force),
the model loader, and end-to-end runs of the command on tiny random models with real photos."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

from vitscale.analysis.attention import (attention_rollout, mean_attention_distance, patch_distance_matrix,
                                         query_attention_to_patches, rollout_to_patches)
from vitscale.analysis.filters import patch_filter_pca
from vitscale.analysis.pos_embed import pos_embed_similarity, similarity_stats
from vitscale.models import create_model
from vitscale.models.pos_embed import sincos_2d

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def brute_mean_distance(gh, gw, patch):
    """Mean Euclidean distance (pixels) between all ordered pairs of patch centres, self-pairs included."""
    cells = list(itertools.product(range(gh), range(gw)))
    total = sum(math.hypot((r1 - r2) * patch, (c1 - c2) * patch) for (r1, c1), (r2, c2) in
                itertools.product(cells, cells))
    return total / len(cells) ** 2


def uniform_attn(b, heads, n):
    return torch.full((b, heads, n, n), 1.0 / n)


# ----- mean attention distance ----------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,patch,prefix", [((4, 4), 16, 1), ((3, 5), 14, 1), ((6, 6), 4, 0)])
def test_uniform_attention_gives_mean_grid_distance(grid, patch, prefix):
    gh, gw = grid
    n = gh * gw + prefix
    maps = [uniform_attn(2, 3, n) for _ in range(2)]
    d = mean_attention_distance(maps, grid, patch, prefix)
    assert d.shape == (2, 3)
    expected = brute_mean_distance(gh, gw, patch)
    assert torch.allclose(d, torch.full_like(d, expected), rtol=1e-5), (d, expected)
    # 2x2 grid by hand: per query 0 + 1 + 1 + sqrt(2) patches -> (2 + sqrt 2) / 4
    d2 = mean_attention_distance([uniform_attn(1, 1, 5)], (2, 2), 10, 1)
    assert d2.item() == pytest.approx(10 * (2 + math.sqrt(2)) / 4, rel=1e-6)


def test_self_attention_gives_zero_and_neighbour_gives_one_patch():
    gh, gw, p, prefix = 4, 5, 16, 1
    n = gh * gw + prefix
    eye = torch.eye(n).expand(2, 4, n, n)
    assert torch.count_nonzero(mean_attention_distance([eye, eye], (gh, gw), p, prefix)) == 0
    # every patch attends only to its horizontal neighbour: exactly one patch (16 px) away
    a = torch.zeros(1, 1, n, n)
    a[0, 0, 0, 0] = 1.0
    for r in range(gh):
        for c in range(gw):
            nc = c + 1 if c + 1 < gw else c - 1
            a[0, 0, prefix + r * gw + c, prefix + r * gw + nc] = 1.0
    assert mean_attention_distance([a], (gh, gw), p, prefix).item() == pytest.approx(16.0)


def test_distance_matrix_is_euclidean_in_pixels():
    d = patch_distance_matrix((2, 3), 8)
    assert d.shape == (6, 6)
    assert d[0, 5].item() == pytest.approx(math.hypot(8, 16))  # (0,0) -> (1,2)
    assert torch.allclose(d, d.T) and torch.count_nonzero(torch.diagonal(d)) == 0


# ----- attention rollout ------------------------------------------------------------------------------------------
def test_rollout_of_identity_attention_is_uniform_over_patches():
    grid, prefix = (3, 4), 1
    n = 12 + prefix
    eye = torch.eye(n).expand(2, 3, n, n).clone()
    r = attention_rollout([eye] * 4, prefix)
    assert torch.allclose(r, torch.eye(n).expand(2, n, n))  # nothing mixes
    m = rollout_to_patches(r, prefix, grid, has_cls=True)
    assert m.shape == (2, 3, 4)
    assert torch.allclose(m, torch.full_like(m, 1 / 12))
    # uniform attention also gives a uniform patch map (all patches are symmetric)
    mu = rollout_to_patches(attention_rollout([uniform_attn(1, 2, n)] * 3, prefix), prefix, grid, has_cls=True)
    assert torch.allclose(mu, torch.full_like(mu, 1 / 12))


def test_rollout_matches_hand_computed_product():
    torch.manual_seed(0)
    n, prefix = 5, 1
    maps = [torch.rand(1, 2, n, n).softmax(-1) for _ in range(3)]
    expected = np.eye(n)
    for a in maps:
        a_hat = 0.5 * a[0].double().mean(0).numpy() + 0.5 * np.eye(n)
        a_hat /= a_hat.sum(1, keepdims=True)
        expected = a_hat @ expected
    got = attention_rollout(maps, prefix)[0].double().numpy()
    assert np.allclose(got, expected, atol=1e-6)
    assert np.allclose(got.sum(1), 1.0, atol=1e-6)  # rows stay distributions
    # [CLS] attending only to one patch: after one layer, all of [CLS]'s patch input is that patch
    a = torch.eye(n)[None, None].clone()
    a[0, 0, 0] = torch.tensor([0.0, 0, 0, 1, 0])
    m = rollout_to_patches(attention_rollout([a], prefix), prefix, (2, 2), has_cls=True)
    assert torch.equal(m[0], torch.tensor([[0.0, 0], [1, 0]]))
    q = query_attention_to_patches(a, prefix, (2, 2), head=0, has_cls=True)
    assert torch.equal(q[0], torch.tensor([[0.0, 0], [1, 0]]))


def _strip(a, keep):
    """The map over tokens ``keep`` only, rows renormalised: what a model without the other tokens would show."""
    a = a[..., keep, :][..., keep]
    return a / a.sum(dim=-1, keepdim=True)


def test_register_tokens_are_skipped_by_rollout_distance_and_queries():
    """[CLS] + 3 registers that soak up most of the attention (as registers do): the patch maps and distances equal
    those of the same map with the register rows and columns removed."""
    torch.manual_seed(0)
    grid, regs = (3, 3), 3
    n = 1 + regs + 9
    a = torch.rand(2, 4, n, n)
    a[..., 1:1 + regs] *= 20.0  # registers take ~85% of every row
    a = a / a.sum(dim=-1, keepdim=True)
    no_regs = _strip(a, [0] + list(range(1 + regs, n)))
    # one layer of rollout, one head (the head mean would mix per-head normalisations): the [CLS] row over the
    # patches is A[0, patches] (the identity adds nothing there), renormalised either way
    got = rollout_to_patches(attention_rollout([a[:, :1]], 1 + regs), 1 + regs, grid, has_cls=True)
    want = rollout_to_patches(attention_rollout([no_regs[:, :1]], 1), 1, grid, has_cls=True)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)  # both are distributions over 9 patches: values ~0.1
    d = mean_attention_distance([a], grid, 16, 1 + regs)
    assert torch.allclose(d, mean_attention_distance([no_regs], grid, 16, 1), atol=1e-4, rtol=0)  # pixels ~20
    q = query_attention_to_patches(a, 1 + regs, grid, has_cls=True)
    assert torch.allclose(q, a.mean(dim=1)[:, 0, 1 + regs:].reshape(2, 3, 3))
    assert float(q.sum(dim=(1, 2)).max()) < 0.5  # raw weights: the registers took the rest
    # no [CLS], registers only: the query is the mean over the patch rows, never register 0's row
    no_cls = a[..., 1:, 1:] / a[..., 1:, 1:].sum(dim=-1, keepdim=True)
    q = query_attention_to_patches(no_cls, regs, grid, has_cls=False)
    assert torch.allclose(q, no_cls.mean(dim=1)[:, regs:, regs:].mean(dim=1).reshape(2, 3, 3))


def test_analysis_of_a_model_with_registers_uses_cls_and_patches_only():
    from vitscale.analysis.run import attention_pass

    torch.manual_seed(0)
    enc = create_model("vit_micro_patch8", img_size=32, reg_tokens=4, qk_norm=True, global_pool="avg",
                       class_token=False).eval()
    out = attention_pass(enc, torch.randn(2, 3, 32, 32), head=0)
    assert out["rollout"].shape == (2, 4, 4) and out["layer_maps"].shape == (4, 2, 4, 4)
    assert torch.allclose(out["rollout"].sum(dim=(1, 2)), torch.ones(2))  # a distribution over the 16 patches
    with torch.no_grad():
        maps = enc.get_attention_maps(torch.randn(1, 3, 32, 32))
    assert maps[0].shape[-1] == 4 + 16


# ----- position embeddings ----------------------------------------------------------------------------------------
def test_pos_embed_similarity_learned_and_sincos():
    torch.manual_seed(0)
    learned = torch.randn(1, 1 + 16, 32)
    sim = pos_embed_similarity(learned, num_prefix_tokens=1)
    assert sim.shape == (16, 16)
    assert torch.allclose(torch.diagonal(sim), torch.ones(16), atol=1e-6)
    x = learned[0, 1:].double().numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert np.allclose(sim.numpy(), x @ x.T, atol=1e-6)  # independent cosine similarity
    table = sincos_2d(64, (5, 5), num_prefix_tokens=1)
    s2 = pos_embed_similarity(table, 1)
    assert torch.allclose(torch.diagonal(s2), torch.ones(25), atol=1e-6)
    assert torch.allclose(s2, s2.T, atol=1e-6)
    stats = similarity_stats(s2, (5, 5))
    assert stats["diagonal_min"] == pytest.approx(1.0, abs=1e-6)
    assert stats["neighbour_mean"] > stats["offdiag_mean"]  # nearby positions are more alike
    assert stats["corr_with_distance"] < -0.5


# ----- patch-filter PCA -------------------------------------------------------------------------------------------
def test_pca_orthonormal_ordered_and_matches_sklearn():
    from sklearn.decomposition import PCA

    torch.manual_seed(0)
    w = torch.randn(96, 3, 4, 4) * torch.linspace(0.1, 3.0, 48).reshape(1, 3, 4, 4)  # anisotropic
    pca = patch_filter_pca(w, k=28)
    assert pca.components.shape == (28, 3, 4, 4)
    c = pca.components.reshape(28, -1).double()
    assert torch.allclose(c @ c.T, torch.eye(28, dtype=torch.float64), atol=1e-5)
    ev = pca.explained_variance
    assert torch.all(ev[:-1] >= ev[1:])
    ref = PCA(n_components=28).fit(w.reshape(96, -1).double().numpy())
    assert np.allclose(ev.numpy(), ref.explained_variance_, rtol=1e-4)
    assert np.allclose(pca.explained_variance_ratio.numpy(), ref.explained_variance_ratio_, rtol=1e-4)
    assert np.allclose(np.abs((c.numpy() * ref.components_).sum(1)), 1.0, atol=1e-4)  # same axes up to sign
    # filters varying along two known directions only: those are the top two components
    e1, e2 = torch.zeros(48), torch.zeros(48)
    e1[5], e2[20] = 1.0, 1.0
    # zero-mean, uncorrelated coefficients with variances 9 and 1
    a = 3.0 * torch.tensor([1.0, -1.0] * 32)[:, None]
    b = torch.tensor([1.0, 1.0, -1.0, -1.0] * 16)[:, None]
    p2 = patch_filter_pca((a * e1 + b * e2).reshape(64, 3, 4, 4), k=5)
    top = p2.components.reshape(-1, 48)
    assert torch.allclose(top[0].abs(), e1, atol=1e-5) and torch.allclose(top[1].abs(), e2, atol=1e-5)
    assert p2.explained_variance[2:].abs().max() < 1e-8
    assert p2.explained_variance_ratio[:2].sum().item() == pytest.approx(1.0, abs=1e-6)


# ----- loader and end-to-end ----------------------------------------------------------------------------------------
MODEL_CFG = dict(name="vit_micro_patch4", img_size=32, patch_size=None, embed_dim=None, depth=None, num_heads=None,
                 global_pool="token", drop_path=0.0, grad_checkpointing=False)


def save_export(model, path, objective, part, cfg=MODEL_CFG):
    """What `vitscale export` writes: fp32 tensors + model config, objective and part in the metadata."""
    from safetensors.torch import save_file

    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"vitscale_model": json.dumps(cfg), "vitscale_objective": objective,
                                       "vitscale_part": part, "step": "7"})
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import skimage.data
    from PIL import Image

    d = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut", "chelsea"):
        p = d / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(p)
        paths.append(str(p))
    return paths


def run_command(argv):
    """The real `vitscale` entry point (errors become exit code 2 there; re-raised here to match on them)."""
    from vitscale.cli import main

    os.environ["VITSCALE_DEBUG"] = "1"
    try:
        return main(argv)
    finally:
        del os.environ["VITSCALE_DEBUG"]


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, (path, len(data))


def test_loader_roundtrip_safetensors_and_checkpoint_dir(tmp_path):
    from vitscale.weights import load_model as load_model_for_analysis

    torch.manual_seed(0)
    model = create_model("vit_micro_patch4", img_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    loaded, info = load_model_for_analysis(save_export(model, tmp_path / "m.safetensors", "supervised", "full"))
    assert torch.allclose(loaded(x), ref, atol=1e-5)
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    assert info["num_classes"] == 10 and info["grid_size"] == [8, 8] and info["step"] == 7
    assert info["pos_embed_type"] == "learn" and info["objective"] == "supervised" and not info["is_hybrid"]
    # a (ZeRO-0 layout) run directory: model states + trainer_state.json + COMPLETE + latest
    ck = tmp_path / "run" / "checkpoints" / "step_00000003"
    ck.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, ck / "mp_rank_00_model_states.pt")
    (ck / "trainer_state.json").write_text(json.dumps({"step": 3, "config": {
        "model": MODEL_CFG, "objective": {"name": "supervised", "norm_pix_loss": True}}}))
    files = {p.name: p.stat().st_size for p in ck.iterdir()}
    (ck / "COMPLETE").write_text(json.dumps({"step": 3, "files": files}))
    (ck.parent / "latest").write_text("step_00000003\n")
    loaded2, info2 = load_model_for_analysis(tmp_path / "run")
    assert torch.allclose(loaded2(x), ref, atol=1e-5)
    assert info2["source"] == "checkpoint" and info2["step"] == 3
    # MAE encoder-only export -> plain ViT with sin-cos table and no head
    mae = create_model("mae_vit_micro_patch4", img_size=32).eval()
    enc, info3 = load_model_for_analysis(save_export(mae.encoder, tmp_path / "e.safetensors", "mae", "encoder"))
    assert info3["pos_embed_type"] == "sincos" and info3["num_classes"] == 0 and info3["part"] == "encoder"
    assert torch.allclose(enc.forward_features(x), mae.encoder.forward_features(x), atol=1e-5)


def test_analyze_command_end_to_end(tmp_path, photos, capsys):
    torch.manual_seed(0)
    model = create_model("vit_micro_patch4", img_size=32, num_classes=10)
    ckpt = save_export(model, tmp_path / "tiny.safetensors", "supervised", "full")
    out = tmp_path / "out"
    assert run_command(["analyze", str(ckpt), *photos, "--out", str(out), "--head", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    expected = ["attention_rollout.png", "attention_layers_head2_astronaut.png", "attention_layers_head2_chelsea.png",
                "mean_attention_distance.png", "pos_embed_similarity.png", "patch_filters_pca.png"]
    for name in expected:
        check_png(out / name)
        assert f"wrote {out / name}" in printed
    doc = json.loads((out / "analysis.json").read_text())
    assert sorted(doc["files"]) == sorted(expected)
    assert doc["images"] == ["astronaut", "chelsea"]
    att = doc["attention"]
    assert np.array(att["mean_distance_px"]).shape == (4, 4)  # depth x heads
    assert np.array(att["mean_distance_px_per_image"]["chelsea"]).shape == (4, 4)
    assert att["uniform_distance_px"] == pytest.approx(brute_mean_distance(8, 8, 4), rel=1e-6)
    assert all(0 < v < 32 * math.sqrt(2) for row in att["mean_distance_px"] for v in row)
    for name in ("astronaut", "chelsea"):
        m = np.array(att["rollout"][name]["map"])
        assert m.shape == (8, 8) and m.sum() == pytest.approx(1.0, abs=1e-4)
        assert len(att["layer_attention_head"][name]) == 4
    pe = doc["pos_embed"]
    assert pe["type"] == "learn" and pe["diagonal_min"] == pytest.approx(1.0, abs=1e-5)
    f = doc["filters"]
    assert f["num_components"] == 28 and f["filter_shape"] == [3, 4, 4]
    assert all(a >= b for a, b in zip(f["explained_variance"], f["explained_variance"][1:]))
    assert "mae" not in doc
    with pytest.raises(ValueError, match="out of range"):
        run_command(["analyze", str(ckpt), photos[0], "--out", str(out), "--head", "4"])


def test_analyze_uses_the_runs_own_mask_ratio(tmp_path, photos):
    # an export records its run's objective section: analyze masks at that ratio unless told otherwise
    from safetensors.torch import save_file

    from vitscale.analysis.run import analyze

    torch.manual_seed(0)
    mae = create_model("mae_vit_micro_patch4", img_size=32, mask_ratio=0.6)
    sd = {k: v.detach().float().contiguous() for k, v in mae.state_dict().items()}
    objective = {"name": "mae", "mask_ratio": 0.6, "norm_pix_loss": False}
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={
        "vitscale_model": json.dumps(MODEL_CFG), "vitscale_objective": "mae", "vitscale_part": "full",
        "vitscale_objective_config": json.dumps(objective), "step": "3"})
    doc = analyze(tmp_path / "m.safetensors", photos[:1], tmp_path / "out", only=["mae"], log=lambda s: None)
    assert doc["mae"]["mask_ratio"] == 0.6 and doc["mae"]["norm_pix_loss"] is False
    assert analyze(tmp_path / "m.safetensors", photos[:1], tmp_path / "out2", mask_ratio=0.25, only=["mae"],
                   log=lambda s: None)["mae"]["mask_ratio"] == 0.25


def test_analyze_mae_reconstruction_and_hybrid_notes(tmp_path, photos):
    from vitscale.analysis.run import analyze

    torch.manual_seed(0)
    mae = create_model("mae_vit_micro_patch4", img_size=32)
    ckpt = save_export(mae, tmp_path / "mae.safetensors", "mae", "full")
    doc = analyze(ckpt, photos, tmp_path / "mae", mask_ratio=0.5, norm_pix_loss=False, only=["mae", "pos_embed"],
                  log=lambda s: None)
    check_png(tmp_path / "mae" / "mae_reconstruction.png")
    assert doc["mae"]["mask_ratio"] == 0.5 and set(doc["mae"]["masked_mse"]) == {"astronaut", "chelsea"}
    assert doc["pos_embed"]["type"] == "sincos"
    # reconstruction numbers agree with the model's own loss (no norm_pix_loss: same pixel space)
    mse = list(doc["mae"]["masked_mse"].values())
    assert doc["mae"]["model_loss"] == pytest.approx(sum(mse) / len(mse), rel=1e-4)
    # hybrid: filters do not apply, distances use the stem's stride
    hcfg = dict(MODEL_CFG, name="vit_hybrid_r50_micro_patch16", img_size=64)
    hyb = create_model("vit_hybrid_r50_micro_patch16", img_size=64, num_classes=3)
    hpath = save_export(hyb, tmp_path / "hyb.safetensors", "supervised", "full", cfg=hcfg)
    hdoc = analyze(hpath, photos[:1], tmp_path / "hyb", only=["distance", "filters"], log=lambda s: None)
    assert "skipped" in hdoc["filters"] and "ResNet stem" in hdoc["filters"]["skipped"]
    assert hdoc["attention"]["token_stride_px"] == [16, 16] and "stride" in hdoc["attention"]["note"]
    assert hdoc["attention"]["uniform_distance_px"] == pytest.approx(brute_mean_distance(4, 4, 16), rel=1e-6)
    assert not (tmp_path / "hyb" / "patch_filters_pca.png").exists()
    assert sorted(p.name for p in (tmp_path / "hyb").iterdir()) == ["analysis.json", "mean_attention_distance.png"]


def test_analyze_a_vit_trained_on_the_demo_digits(tmp_path, trained_run):
    """The command end to end on a run directory of a tiny ViT trained on the bundled digits, with digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from conftest import copy_run

    copy_run(trained_run, tmp_path, "digits")  # the session's tiny demo run (4 steps)
    digits, images = load_digits(), []
    for i, folder in ((1790, "a"), (1796, "b")):  # two files of the same name: outputs must not collide
        img = (digits.images[i] * 255 / 16).astype(np.uint8).repeat(4, 0).repeat(4, 1)
        images.append(tmp_path / folder / "digit.png")
        images[-1].parent.mkdir()
        Image.fromarray(np.stack([img] * 3, -1)).save(images[-1])
    out = tmp_path / "analysis"
    assert run_command(["analyze", str(tmp_path / "digits"), *map(str, images), "--out", str(out),
                        "--device", "cpu"]) == 0
    doc = json.loads((out / "analysis.json").read_text())
    for name in doc["files"]:
        check_png(out / name)
    assert len(doc["files"]) == 6 and doc["images"] == ["digit", "digit_2"] and doc["model"]["step"] == 4
    assert np.array(doc["attention"]["mean_distance_px"]).shape == (2, 2)  # depth x heads of the TINY model
    assert doc["pos_embed"]["diagonal_min"] == pytest.approx(1.0, abs=1e-5)


def test_analyze_refuses_an_out_that_is_a_file_before_any_work(tmp_path, capsys, monkeypatch):
    """--out is a folder: a file there was a FileExistsError traceback; now one line, before the model is read (the
    checkpoint here is no model at all), and the file is untouched. An existing folder is still fine (re-runs)."""
    from vitscale.cli import main
    from vitscale.weights.outfile import check_folder_path

    monkeypatch.setenv("VITSCALE_DEBUG", "")
    taken = tmp_path / "taken.json"
    taken.write_text("keep me")
    for out, line in ((taken, f"--out {taken} exists and is not a folder"),
                      (taken / "sub", f"--out {taken / 'sub'}: {taken} is a file, not a folder")):
        assert main(["analyze", str(tmp_path / "no_model.safetensors"), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"vitscale: error: {line}\n"
    assert taken.read_text() == "keep me"
    check_folder_path(tmp_path, "--out")  # an existing folder
    check_folder_path(tmp_path / "new" / "deeper", "--out")  # one to be made
