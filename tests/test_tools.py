"""vitscale plot / bench / plan: real figures from real runs, numbers checked against hand calculations and
against memory measured on a real engine step."""
import json
import struct

import pytest
import torch

from conftest import DEMO, TINY, copy_run, run_cli
from vitscale.bench.memory import LiveTensorMemory
from vitscale.bench.plan import activation_bytes, model_shape, plan_memory
from vitscale.logging.plot import plot_run
from vitscale.config.load import load_config
from vitscale.models.registry import count_params

TITLES = ["loss", "learning rate", "throughput", "MFU", "data wait"]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _one_line_error(r):
    lines = [line for line in r.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("vitscale: error: "), r.stderr[-2000:]
    return lines[0]


# ----- plot -------------------------------------------------------------------------------------------------------
def _write_metrics(path, steps, mfu=True):
    lines = []
    for s in steps:
        lines.append({"step": s, "samples": 64 * s, "loss": 3.0 / s, "lr": 1e-3 * min(s, 5) / 5,
                      "samples_per_s": 100.0 + s, "mfu": 0.3 + 0.001 * s if mfu else None,
                      "data_wait_frac": 0.05, "mem_gb": 1.0})
    lines.append({"step": steps[-1], "val_images": 297, "val_loss": 0.5, "val_acc": 0.9})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_plot_synthetic_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # A resumed run logs steps 5 and 6 twice; the later lines win.
    _write_metrics(run / "metrics.jsonl", [1, 2, 3, 4, 5, 6, 5, 6, 7, 8])
    res = plot_run(run)
    assert res["titles"] == TITLES and res["unavailable"] == [] and res["steps"] == 8
    w, h = _png_size(run / "metrics.png")
    assert w > 1000 and 200 < h < w  # five panels side by side

    _write_metrics(run / "metrics.jsonl", [1, 2, 3], mfu=False)  # CPU: mfu is null
    res = plot_run(run, tmp_path / "cpu.png")
    assert res["unavailable"] == ["mfu"] and res["titles"] == TITLES
    _png_size(tmp_path / "cpu.png")


def test_read_metrics_gives_an_old_runs_val_acc_as_val_top1(tmp_path):
    """Runs written before the rename logged val_acc; the one reader hands it on as val_top1 (plot, sweep tables)."""
    from vitscale.logging.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, [1, 2])  # its last line is an old run's: val_acc
    last = read_metrics(path)[-1]
    assert last == {"step": 2, "val_images": 297, "val_loss": 0.5, "val_top1": 0.9}
    path.write_text(json.dumps({"step": 3, "linear/train_acc": 0.7, "val_top1": 0.8}) + "\n")
    assert read_metrics(path) == [{"step": 3, "linear/train_top1": 0.7, "val_top1": 0.8}]


def test_plot_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        plot_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no training log lines"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match=":2 is not valid JSON"):
        plot_run(tmp_path)


def test_plot_real_training_run(tmp_path, trained_run):
    p = run_cli(["plot", str(copy_run(trained_run, tmp_path)), "--out", str(tmp_path / "fig.png")], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "over 4 log steps" in p.stdout and "(mfu: n/a)" in p.stdout  # no peak FLOP/s on a CPU
    w, h = _png_size(tmp_path / "fig.png")
    assert w > 1000 and h > 200
    (tmp_path / "none").mkdir()
    assert "no metrics.jsonl" in _one_line_error(run_cli(["plot", str(tmp_path / "none")], cwd=tmp_path))


# ----- plan -------------------------------------------------------------------------------------------------------
def test_plan_matches_hand_calculation():
    cfg = load_config(DEMO, ["model.name=vit_base_patch16", "model.img_size=224", "data.num_classes=1000",
                             "data.batch_size=32", "train.precision=bf16", "engine.zero_stage=2"])
    P = count_params("vit_base_patch16", num_classes=1000)
    assert 86e6 < P < 87e6
    n = 4 * 2  # 4 GPUs per node x 2 nodes
    plan = plan_memory(cfg, gpus=4, nodes=2, gpu_mem_gb=80)
    assert plan.params == P and plan.world_size == n
    block = 12 * 768 ** 2 + 13 * 768  # one ViT-B block's parameters
    bucket = 2 * (2 * block) * 2  # two bf16 gradient buckets (overlap_comm on GPUs) of two blocks each
    expect = {  # (params, grads, optimizer states, buffers): 2 + 2 + 12 bytes/param, sharded by stage
        (0, False): (2 * P, 2 * P, 12 * P, 0),
        (1, False): (2 * P, 2 * P, 12 * P // n, bucket),
        (1, True): (2 * P, 2 * P, 0, bucket),
        (2, False): (2 * P, 2 * P // n, 12 * P // n, bucket),
        (2, True): (2 * P, 2 * P // n, 0, bucket),
        (3, False): (2 * P // n, 2 * P // n, 12 * P // n, None),
    }
    for (stage, off), (p, g, o, buf) in expect.items():
        row = plan.row(stage, off)
        assert (row.params, row.grads, row.optimizer) == (p, g, o), row.option
        if buf is not None:
            assert row.buffers == buf
        if off:  # fp32 master + moments (12) and DeepSpeed's fp32 gradient copy (4) on the host, x 4 GPUs/node
            assert row.cpu_per_node == int((12 * P / n + 4 * P / n)) * 4
    assert plan.row(3, True, True).params == 0
    assert plan.row(2).current and not plan.row(0).current

    # Activations, by hand: B=32, N=197 tokens, D=768, M=3072, 12 heads, 12 blocks, bf16 (2 bytes).
    B, N, D, M, h, L = 32, 197, 768, 3072, 12, 12
    block = B * N * ((8 * D + 2 * M) * 2 + (4 + h) * 4)
    other = B * 3 * 224 * 224 * (1 + 2) + 2 * B * N * D * 2 + B * 1000 * (2 + 4)
    act = plan.activation_detail["no_ckpt"]
    assert act == {"blocks": L * block, "other": other, "transient": B * N * M * 2}
    ckpt = plan.activation_detail["ckpt"]
    # the other blocks' inputs + the one block being recomputed (its input is among its own activations)
    assert ckpt["blocks"] == (L - 1) * B * N * D * 2 + block
    r2 = plan.row(2)
    states = r2.params + r2.grads + r2.optimizer + r2.buffers
    assert r2.total == states + sum(act.values()) and r2.total_ckpt == states + sum(ckpt.values())
    assert r2.fits and not plan_memory(cfg, gpus=4, nodes=2, gpu_mem_gb=6).row(2).fits  # 3.97 GB + 4 GB reserve

    # fp32: no 16-bit copy; from ZeRO-1 on DeepSpeed keeps its own fp32 partition (measured: +4 bytes/param).
    fp32 = plan_memory(load_config(DEMO, ["model.name=vit_base_patch16", "model.img_size=224",
                                          "data.num_classes=1000", "train.precision=fp32"]), gpus=1)
    assert fp32.row(0).optimizer == 8 * P and fp32.row(1).optimizer == 12 * P and fp32.row(0).params == 4 * P

    # MAE: the encoder sees int(196 * 0.25) + [CLS] = 50 tokens, the decoder all 197.
    mae = model_shape(load_config(DEMO, ["objective.name=mae", "model.name=vit_large_patch16",
                                         "model.img_size=224"]), 0)
    assert [(s.name, s.depth, s.tokens, s.dim) for s in mae.stacks] == [("encoder", 24, 50, 1024),
                                                                        ("decoder", 8, 197, 512)]
    assert activation_bytes(mae, 8, 2, False)["blocks"] == 24 * 8 * 50 * (
        (8 * 1024 + 2 * 4096) * 2 + 20 * 4) + 8 * 8 * 197 * ((8 * 512 + 2 * 2048) * 2 + 20 * 4)


def test_plan_selective_checkpointing_never_grows_with_n():
    """model.grad_checkpointing=N (the first N blocks in forward order; MAE: 24 encoder then 8 decoder blocks):
    the activation estimate falls with every block up to the last, where checkpointing saves nothing more."""
    base = ["objective.name=mae", "model.name=vit_large_patch16", "model.img_size=224", "data.batch_size=64"]

    def act(n):
        plan = plan_memory(load_config(DEMO, [*base, f"model.grad_checkpointing={n}"]), gpus=1)
        assert plan.ckpt_blocks == (32 if n is True else min(n, 32)) and plan.blocks == 32
        return sum(plan.activation_detail["ckpt"].values())

    series = [act(n) for n in range(0, 33)]
    assert all(a > b for a, b in zip(series[:31], series[1:32]))  # strictly down to N = 31
    assert series[32] == series[31] == act(True) and act(40) == act(True)
    assert series[0] == sum(plan_memory(load_config(DEMO, base), gpus=1).activation_detail["no_ckpt"].values())
    assert series[24] < 0.5 * series[0]  # the whole encoder recomputed


def test_plan_device_cpu_counts_the_runtime_and_the_unfused_adamw_step():
    """--device cpu (a rehearsal's CPU processes): each process carries the runtime, and the step's temporaries are
    two AdamW temporaries of the partition stepped (+ a flat gradient copy under ZeRO-3): the largest parameter
    group's share under ZeRO-2, one sub-group (2 blocks) under ZeRO-3. MAE ViT-L/16 fp32 on 2 processes, by hand."""
    from vitscale.bench.plan import CPU_RUNTIME_BYTES

    cfg = load_config(DEMO, ["objective.name=mae", "model.name=vit_large_patch16", "model.img_size=224",
                             "data.batch_size=2", "train.precision=fp32"])
    plan = plan_memory(cfg, gpus=2, device="cpu", gpu_mem_gb=12, reserve_gb=0)
    shape = model_shape(cfg, 0)
    P, T, block = shape.params, shape.trainable, shape.sizes.block_params
    assert block == 12 * 1024 ** 2 + 13 * 1024 and 329e6 < P < 330e6
    act = sum(plan.activation_detail["no_ckpt"].values())
    z3, z2 = plan.row(3), plan.row(2)
    assert z3.buffers == CPU_RUNTIME_BYTES + 2 * block * 4 + (2 * block + 2 * block + shape.small_params) * 4
    assert z3.step_extra == 3 * 4 * 2 * block  # one sub-group of 2 blocks, not the whole partition
    assert (z3.params, z3.grads, z3.optimizer) == (4 * P // 2, 4 * T // 2, 12 * T // 2)
    assert z3.total == z3.params + z3.grads + z3.optimizer + z3.buffers + max(act, z3.step_extra)
    assert z2.buffers == CPU_RUNTIME_BYTES + 2 * block * 4  # one 2-block bucket: no overlap on CPU
    # ZeRO-2 steps one parameter group at a time: without layer decay the decayed weights are nearly all of the model
    group = shape.largest_group
    assert 0.99 * T < group < T
    assert z2.step_extra == int(group / 2 * 4 * 2)  # two AdamW temporaries; the fp32 gradients are stepped in place
    # measured 4.60, 5.86: docs/benchmarks.md
    assert 4.0 * 2 ** 30 < z3.total < 5.0 * 2 ** 30 < z2.total < 6.2 * 2 ** 30
    assert plan_memory(cfg, gpus=2).row(3).buffers < z3.buffers  # a GPU plan has no process runtime


@pytest.mark.parametrize("case", [
    # supervised, bf16, ZeRO-2: the recipe setting (2 + 2 + 12 bytes/param)
    ["train.precision=bf16", "engine.zero_stage=2"],
    # MAE with gradient checkpointing, fp32, ZeRO-1
    ["objective.name=mae", "model.grad_checkpointing=true", "train.precision=fp32", "engine.zero_stage=1"],
])
def test_plan_within_20_percent_of_measured_peak(tmp_path, data_cache, case):
    # A small gradient bucket: DeepSpeed's default 5e8 elements (1.9 GB) would dwarf everything else and make
    # any error in the rest invisible.
    args = ["plan", "--config", DEMO, f"data.cache_dir={data_cache}", *TINY, *case,
            "engine.ds_config.zero_optimization.reduce_bucket_size=50000", "--measure", "--json",
            str(tmp_path / "plan.json")]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "plan.json").read_text())["measured"]
    assert "LiveTensorMemory" in m["method"] and m["peak_bytes"] > m["at_rest_bytes"] > 0
    assert 0.8 <= m["plan_over_measured"] <= 1.2, m
    # At rest (between steps) only params + optimizer states are alive: bf16 2 + 12, fp32 ZeRO-1 4 + 4 + 8.
    per_param = m["at_rest_bytes"] / m["params"]
    assert per_param == pytest.approx(14 if "train.precision=bf16" in case else 16, rel=0.05)
    assert "plan/measured" in r.stdout


def test_plan_steps_one_parameter_group_at_a_time_as_measured(tmp_path, data_cache):
    """Where the optimizer step is the peak (7M parameters, batch 1), the plan follows DeepSpeed's ZeRO-2 step, one
    optimizer parameter group at a time: without layer decay the step's AdamW temporaries are the size of nearly
    the whole model, with optim.layer_decay (a group per block) of one block, and the measured peak falls with them.
    (The plan counted three copies of the whole share before: 1.36x the measured 1-process ZeRO-2 ViT-H/14 resume.)"""
    measured = {}
    for layer_decay in (1.0, 0.65):
        out = tmp_path / f"plan{layer_decay}.json"
        r = run_cli(["plan", "--config", DEMO, f"data.cache_dir={data_cache}", "model.embed_dim=384", "model.depth=4",
                     "model.num_heads=4", "data.batch_size=1", "data.num_workers=0", "engine.zero_stage=2",
                     "train.precision=fp32", f"optim.layer_decay={layer_decay}",
                     "engine.ds_config.zero_optimization.reduce_bucket_size=50000", "--measure", "--json", str(out)],
                    cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        m = json.loads(out.read_text())["measured"]
        assert 0.93 <= m["plan_over_measured"] <= 1.07, (layer_decay, m)
        measured[layer_decay] = m
    whole, per_block = measured[1.0], measured[0.65]
    assert whole["at_rest_bytes"] == pytest.approx(per_block["at_rest_bytes"], rel=1e-3)  # the same states (+ padding)
    # the step's temporaries: 8 bytes a parameter of the largest group (~7M vs ~1.8M parameters)
    assert whole["peak_bytes"] - per_block["peak_bytes"] > 0.3 * 8 * whole["params"] * 0.5


# ----- bench ------------------------------------------------------------------------------------------------------
def test_live_tensor_memory_counts_storages():
    mem = LiveTensorMemory()
    with mem:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.ones(500, dtype=torch.float64)  # 4000 bytes
        v = a[10:20]  # a view: no new storage
        del a, v
        c = torch.zeros(250)  # a's storage is gone by now: 4000 + 1000 live, peak stays 8000
    assert (mem.peak, mem.live_bytes()) == (8000, 5000)
    del b, c
    assert mem.live_bytes() == 0


def test_bench_all_modes_and_timm_ratio(tmp_path, data_cache):
    out = tmp_path / "bench.json"
    r = run_cli(["bench", "--config", DEMO, f"data.cache_dir={data_cache}", *TINY, "--iters", "3",
                 "--warmup", "1", "--rounds", "2", "--threads", "1", "--json", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    modes = res["modes"]
    assert set(modes) == {"model", "timm", "engine", "loader", "step"}
    for name, m in modes.items():
        assert m["img_per_s"] > 0 and m["step_ms"] > 0, name
        assert m["mfu"] is None  # no known peak on a CPU
    assert res["timm_params"] == res["params"]  # timm's model really has our configuration
    # the ratio pairs rounds run back to back (same load); with 2 rounds the median is the mean of the 2 pairs
    per_round = [t / o for o, t in zip(modes["model"]["rounds_s"], modes["timm"]["rounds_s"])]  # equal images a round
    assert res["ratios"]["model/timm"] == pytest.approx(sum(per_round) / 2)
    assert 0 <= modes["step"]["data_wait_frac"] < 1
    # fp32 model + AdamW: params 4 + grads 4 + two moments 8 bytes/param at least, plus activations.
    for name in ("model", "timm"):
        assert modes[name]["peak_mem_bytes"] > 16 * res["params"]
    # The engine adds DeepSpeed's fp32 gradient bucket (capped at the model's size, at least 1e6 elements) and
    # its flat fp32 partition on top of what the plain model holds.
    assert modes["engine"]["peak_mem_bytes"] > modes["model"]["peak_mem_bytes"] + 1e6 * 4
    assert "ratio model/timm" in r.stdout and "MFU: n/a on this device" in r.stdout


def test_bench_data_loaders(tmp_path):
    out = tmp_path / "data.json"
    r = run_cli(["bench", "--what", "data", "--images", "48", "--min-size", "64", "--max-size", "96",
                 "--img-size", "32", "--batch-size", "8", "--workers", "1", "--batches", "3", "--rounds", "1",
                 "--tar-readers", "--json", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    ips = res["img_per_s"]
    assert min(ips.values()) > 0 and set(ips) == {"vitscale", "vitscale_wds_tar", "imagefolder", "decode_only"}
    assert res["tar_reader_speedup"] == pytest.approx(ips["vitscale"] / ips["vitscale_wds_tar"])
    assert res["per_image_ms"]["tar_ours_us"] > 0 and res["per_image_ms"]["tar_wds_us"] > 0
    assert "tar readers:" in r.stdout
    assert res["ratio_vs_imagefolder"] == pytest.approx(ips["vitscale"] / ips["imagefolder"])
    assert res["per_image_ms"]["decode"] > 0 and res["per_image_ms"]["transform"] > 0
    assert res["bound"] in res["stage_ms"]
    assert "vs ImageFolder" in r.stdout and "bound:" in r.stdout


def test_imagenet_sized_bench_jpegs(tmp_path):
    from PIL import Image

    from vitscale.bench.data_inputs import imagenet_like

    files = imagenet_like(tmp_path, 8, seed=0)
    sizes = [Image.open(f).size for f in files]
    assert sizes.count((500, 375)) == 6 and sizes.count((375, 500)) == 2
    kb = [f.stat().st_size / 1024 for f in files]
    assert 90 < sum(kb) / len(kb) < 125, kb  # ImageNet's training JPEGs average ~110 KB


def test_bench_and_plan_bad_input(tmp_path):
    assert "--config is required" in _one_line_error(run_cli(["bench"], cwd=tmp_path))
    assert "runs alone" in _one_line_error(run_cli(["bench", "--what", "data,model"], cwd=tmp_path))
    err = _one_line_error(run_cli(["plan", "--config", DEMO, "--gpus", "0"], cwd=tmp_path))
    assert "--gpus and --nodes must be >= 1" in err
    from vitscale.bench.speed import run_bench

    with pytest.raises(ValueError, match="unknown mode"):
        run_bench(load_config(DEMO), ("modle",))


def test_bench_model_mode_mae_vs_timm_block_mae():
    """In-process, model mode only (no engine): our MAE vs the paper's timm-block MAE of the same size."""
    from vitscale.bench.speed import run_bench

    cfg = load_config(DEMO, [*TINY, "objective.name=mae", "model.grad_checkpointing=true"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as --threads 1: steadier and faster on a busy 2-core machine
    try:
        res = run_bench(cfg, ("model",), iters=1, warmup=1, rounds=1)
    finally:
        torch.set_num_threads(threads)
    assert set(res["modes"]) == {"model", "timm"}
    assert res["timm_params"] == res["params"]  # same encoder, decoder and frozen sin-cos tables
    for m in res["modes"].values():
        assert m["img_per_s"] > 0 and m["peak_mem_bytes"] > 16 * res["params"]
    assert res["flops_per_image"] > 0 and res["ratios"]["model/timm"] > 0


def test_bench_freezes_what_the_config_freezes():
    """bench built its models without model.freeze: a linear probe's step trained every parameter, and its MFU
    counted a full backward (3x forward) where a frozen encoder needs none."""
    from vitscale.bench.speed import run_bench

    results = {}
    for spec in ("", "encoder"):
        cfg = load_config(DEMO, [*TINY, f"model.freeze={spec}"])
        results[spec] = run_bench(cfg, ("model",), iters=1, warmup=0, rounds=1, timm=False)
    full, probe = results[""]["flops_per_image"], results["encoder"]["flops_per_image"]
    assert 0.3 < probe / full < 0.4, (probe, full)  # forward everywhere, backward in the head alone: ~1/3


def test_bench_skips_timm_when_its_model_cannot_take_the_freeze(capsys):
    """model.freeze names our parameters; an MAE's (encoder.blocks.0) names none of timm's MAE, and bench failed
    with a ConfigError. The timm row is skipped with one line; where the names exist (a ViT) timm is frozen too."""
    from vitscale.bench.speed import run_bench

    mae = load_config(DEMO, [*TINY, "objective.name=mae", "model.freeze=encoder.blocks.0"])
    res = run_bench(mae, ("model",), iters=1, warmup=0, rounds=1)
    assert set(res["modes"]) == {"model"}
    assert "bench: model.freeze='encoder.blocks.0' names no parameter of timm's model: the timm row is skipped" \
        in capsys.readouterr().out
    vit = load_config(DEMO, [*TINY, "model.freeze=blocks.0"])
    assert set(run_bench(vit, ("model",), iters=1, warmup=0, rounds=1)["modes"]) == {"model", "timm"}


def test_bench_without_timm_skips_only_the_timm_row(monkeypatch, capsys):
    """timm is bench's reference, not a dependency: without it the timm row is skipped with one line."""
    import sys

    from vitscale.bench.cli import _timm_available

    assert _timm_available(True) is True and _timm_available(False) is False  # installed here (test extra)
    monkeypatch.setitem(sys.modules, "timm", None)  # what an install without timm looks like to find_spec
    assert _timm_available(False) is False and capsys.readouterr().out == ""  # not asked for: no message
    assert _timm_available(True) is False
    assert capsys.readouterr().out.strip().splitlines() == [
        "bench: timm is not installed, so the timm reference is skipped (pip install timm, or --no-timm)"]


def test_plan_refuses_a_reserve_as_large_as_the_gpu_and_names_fp32_states(tmp_path, capsys):
    """`plan --gpu-mem 2 --reserve-gb 4` is one line (every row said NO); the footer gives the bytes/param of the
    run's precision: 4+4+8 for fp32 (it said 2+2+12 bf16/fp16 whatever the precision)."""
    from vitscale.bench.plan_report import print_plan

    err = _one_line_error(run_cli(["plan", "--config", DEMO, "--gpu-mem", "2", "--reserve-gb", "4"], cwd=tmp_path))
    assert "--reserve-gb 4 must be less than --gpu-mem 2" in err
    for precision, text in (("fp32", "4+4+8 bytes/param (fp32"), ("bf16", "2+2+12 bytes/param (bf16/fp16)")):
        print_plan(plan_memory(load_config(DEMO, [f"train.precision={precision}"]), gpus=1), False)
        out = capsys.readouterr().out
        assert text in out and out.count("bytes/param") == 1, out
