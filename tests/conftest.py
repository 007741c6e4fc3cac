"""Shared helpers: run the real CLI in a subprocess (the way users and launchers run it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")

# A tiny model on the demo digits: seconds per run on 2 CPU cores.
TINY = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "data.batch_size=16", "data.num_workers=0",
        "train.log_every=1", "train.progress=false", "optim.warmup_steps=3"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One demo-shard cache for the whole session (built once, read by many runs)."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_cache):
    """One TINY demo run trained once per session: 4 steps, checkpoints at steps 2 and 4 (both kept), held-out
    accuracy. Tests that only need a run directory or a checkpoint take a copy (:func:`copy_run`), never this."""
    root = tmp_path_factory.mktemp("trained_run")
    r = run_cli(train_args(root, "tiny", data_cache, "train.steps=4", "train.ckpt_every=2", "train.keep_last=0"),
                cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "tiny"


def copy_run(run_dir, parent, name=None):
    """A private copy of a run directory under PARENT (same name unless NAME): a test may resume or damage it."""
    import shutil

    return Path(shutil.copytree(run_dir, Path(parent) / (name or Path(run_dir).name), symlinks=True))


def run_cli(args, cwd, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "vitscale", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def train_args(run_dir, name, cache, *overrides):
    return ["train", "--config", DEMO, f"run.dir={run_dir}", f"run.name={name}", f"data.cache_dir={cache}",
            *TINY, *overrides]


class PicklePayload:
    """Unpickling this creates a file: if the file never appears, nothing was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def deepspeed_cli(world, port, args, cwd, env_extra=None, timeout=600, script=None):
    """`deepspeed --num_gpus WORLD --module vitscale ARGS` (or `... SCRIPT ARGS`) on CPU processes (gloo)."""
    import shutil

    target = [str(script)] if script is not None else ["--module", "vitscale"]
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(world), "--master_port", str(port),
           *target, *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
           **(env_extra or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# float32's machine epsilon: the relative rounding of one float32 operation.
F32_EPS = 2.0 ** -23


def f32_approx(expected, scale: float, terms: int = 1, margin: float = 4.0):
    """pytest.approx for a float32 result that another summation order (world size, ZeRO stage, CPU kernels, gloo)
    may round differently. Summing `terms` values of magnitude `scale` can move the result by about
    terms x eps x scale, however small the result itself is, so the tolerance is absolute plus a small relative
    part; a relative-only tolerance fails once the result approaches zero (issue 31: a loss of 0.013 after 18
    steps, 3e-8 apart between ZeRO-3 and ZeRO-0, failed rel=2e-6)."""
    return pytest.approx(expected, rel=margin * F32_EPS, abs=margin * F32_EPS * abs(scale) * terms)


def assert_curves_close(got, expected, margin: float = 4.0, what: str = "") -> None:
    """Two float32 training curves (losses per step) from runs that differ only in summation order. Rounding
    differences enter the weights at every step and carry on, so step k's tolerance grows with k:
    margin x eps x k x (the curve's largest magnitude, its first loss). Tight where a real bug shows (a weight
    decay dropped under ZeRO-3 moved step 2 by 2e-5, against 2.2e-6 allowed there for a loss of 2.3), loose
    enough for a loss that approaches zero late in the curve."""
    assert len(got) == len(expected), (what, len(got), len(expected))
    scale = max(abs(x) for x in expected)
    for k, (a, b) in enumerate(zip(got, expected), start=1):
        tol = margin * F32_EPS * scale * k
        assert abs(a - b) <= tol, f"{what} step {k}: {a!r} vs {b!r}, |diff| {abs(a - b):.3g} > {tol:.3g}"


def step_losses(run_dir):
    """{step: loss} of a run's metrics.jsonl (the last record of each step wins, as after a resume)."""
    from vitscale.logging.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def wandb_history(run_dir):
    """[(run id, wandb's internal _step, our step)] of every offline wandb run under RUN_DIR/wandb, in launch order,
    read straight from the .wandb files (W&B's LevelDB-style log of protobuf records)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb2

    def records(data: bytes):
        assert data[:4] == b":W&B"
        pos, block, buf = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a record header never straddles a block: the rest is padding
                pos += block - pos % block
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 1:
                yield chunk
            elif kind == 2:
                buf = chunk
            elif kind == 3:
                buf += chunk
            elif kind == 4:
                yield buf + chunk
            else:
                return

    out = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):  # names start with the launch time
        run_id, next_step = path.stem[len("run-"):], 0
        for chunk in records(path.read_bytes()):
            rec = pb2.Record()
            rec.ParseFromString(chunk)
            if rec.WhichOneof("record_type") == "run":
                next_step = rec.run.starting_step
            if rec.WhichOneof("record_type") != "history":
                continue
            items = {"/".join(i.nested_key) or i.key: i.value_json for i in rec.history.item}
            internal = int(items.get("_step", next_step))
            next_step = internal + 1
            if "step" in items:
                out.append((run_id, internal, int(items["step"])))
    return out
