"""Fault 10: the files vitscale itself reads back are loaded with torch.load(weights_only=True): a tampered
per-rank state file whose unpickling would run code is refused with one line, and the code never runs."""
import ast
import json
from pathlib import Path

import torch

from conftest import ROOT, PicklePayload, copy_run, run_cli, train_args


def test_every_torch_load_in_vitscale_is_weights_only():
    calls = []
    for path in sorted((ROOT / "vitscale").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", safe))
    assert calls, "found no torch.load call: the scan is broken"
    assert [where for where, safe in calls if not safe] == []


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
