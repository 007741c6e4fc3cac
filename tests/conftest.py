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


def run_cli(args, cwd, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "vitscale", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def train_args(run_dir, name, cache, *overrides):
    return ["train", "--config", DEMO, f"run.dir={run_dir}", f"run.name={name}", f"data.cache_dir={cache}",
            *TINY, *overrides]
