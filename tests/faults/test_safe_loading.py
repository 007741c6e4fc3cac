"""Fault 10: loading a checkpoint never runs code. Every torch file vitscale reads, and every file DeepSpeed reads on
vitscale's paths (resume, universal conversion, export, eval, analyze), goes through one weights-only load
(`vitscale.distributed.safeload.safe_load`): a tampered file whose unpickling would run code is refused with one
line naming it, and the code never runs."""
import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, PicklePayload, copy_run, run_cli, train_args

def _torch_load_uses():
    """(where, what) for every reference to torch.load ("torch.load") and every call of safeload's captured original
    ("weights_only=True" or "unsafe")."""
    uses = []
    for path in sorted((ROOT / "vitscale").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name) \
                    and node.value.id == "torch":
                uses.append((where, "torch.load"))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_TORCH_LOAD":
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                uses.append((where, "weights_only=True" if safe else "unsafe"))
    return uses


def test_every_load_in_vitscale_goes_through_safe_load():
    uses = _torch_load_uses()
    outside = [where for where, what in uses if what == "torch.load" and "safeload.py" not in where]
    assert outside == []  # nobody calls torch.load but safeload.py (which captures and patches it)
    calls = [what for where, what in uses if "safeload.py" in where and what != "torch.load"]
    assert calls == ["weights_only=True"], uses  # the one real load, weights-only


def test_tampered_rank_state_is_refused_and_never_run(tmp_path, data_cache, trained_run):
    copy_run(trained_run, tmp_path, "t")
    ckpt = tmp_path / "t" / "checkpoints" / "step_00000004"  # the newest: the one a resume loads
    target = tmp_path / "pwned"
    torch.save({"rng": PicklePayload(str(target))}, ckpt / "rank_00000.pt")
    marker = json.loads((ckpt / "COMPLETE").read_text())  # an attacker would fix the sizes up too
    marker["files"]["rank_00000.pt"] = (ckpt / "rank_00000.pt").stat().st_size
    (ckpt / "COMPLETE").write_text(json.dumps(marker))

    r = run_cli(train_args(tmp_path, "t", data_cache, "train.steps=6", "train.ckpt_every=2"), cwd=tmp_path)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"vitscale: error: {ckpt / 'rank_00000.pt'} holds more than tensors and plain values; "
                           "refusing to unpickle it"), line
    assert not Path(target).exists()


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, data_cache):
    """A finished 1-process ZeRO-2 run: DeepSpeed model states and optimizer states, both read by every entry
    point below."""
    tmp = tmp_path_factory.mktemp("zero2")
    r = run_cli(train_args(tmp, "z", data_cache, "train.steps=2", "train.ckpt_every=2"), cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "z"


def _tamper(ckpt: Path, pattern: str, target: Path) -> Path:
    """Add an object whose unpickling creates `target` to a DeepSpeed file, and fix COMPLETE's sizes up."""
    (f,) = ckpt.glob(pattern)
    state = torch.load(f, map_location="cpu", weights_only=False)  # the test's own, trusted file
    state["extra"] = PicklePayload(target)
    torch.save(state, f)
    marker = json.loads((ckpt / "COMPLETE").read_text())
    marker["files"][f.name] = f.stat().st_size
    (ckpt / "COMPLETE").write_text(json.dumps(marker))
    return f


# eval and analyze read a checkpoint through the same function (consolidated weights), which the export checks for
# the optimizer states too; to keep the suite short each file is checked at the points that read it differently.
@pytest.mark.parametrize("pattern,points", [
    ("mp_rank_00_model_states.pt", ("resume", "universal", "export", "eval", "analyze")),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", ("resume", "universal", "export")),
])
def test_tampered_deepspeed_files_are_refused_by_every_entry_point(tmp_path, data_cache, zero2_run, pattern,
                                                                   points):
    """Resume, conversion to the universal layout (resume under another ZeRO stage), export, eval and analyze each
    refuse the file with one line naming it; the payload's file never appears."""
    from PIL import Image

    run = tmp_path / "z"
    shutil.copytree(zero2_run, run)
    target = tmp_path / "pwned"
    bad = _tamper(run / "checkpoints" / "step_00000002", pattern, target)
    image = tmp_path / "img.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(image)
    resume = train_args(tmp_path, "z", data_cache, "train.steps=4", "train.ckpt_every=2")
    entry_points = {
        "resume": resume,
        "universal": [*resume, "engine.zero_stage=1"],
        "export": ["export", str(run), str(tmp_path / "out.safetensors")],
        "eval": ["eval", "accuracy", str(run), "--data", "demo:digits", "--cache-dir", str(data_cache),
                 "--out", str(tmp_path / "eval")],
        "analyze": ["analyze", str(run), str(image), "--out", str(tmp_path / "analysis")],
    }
    refusal = f"{bad} holds more than tensors and plain values; refusing to unpickle it (Unsupported global: "
    for name in points:
        r = run_cli(entry_points[name], cwd=tmp_path)
        errors = [line for line in r.stderr.splitlines() if line.startswith("vitscale: error:")]
        assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, (name, r.stderr[-3000:])
        assert refusal in errors[0], (name, errors[0])
        assert not target.exists(), name
    assert not (tmp_path / "out.safetensors").exists() and not (run / "checkpoints" / "step_00000004").exists()
