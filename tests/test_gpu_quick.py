"""benchmarks/gpu_quick.sh rehearsed on CPU (QUICK_CPU=1: the same `vitscale bench` commands, a tiny model), and
its table keeping every row when a measurement fails, hangs or runs out of budget."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
sys.path.insert(0, str(ROOT / "benchmarks"))  # the GPU script's driver lives beside it
import quick  # noqa: E402


@pytest.mark.slow
def test_gpu_quick_rehearsal_on_cpu(tmp_path, data_cache):
    """Three runs cover every kind of command in the script: model + timm + engine (ZeRO-2), the compiled
    ZeRO-3 engine, and the real loader step with JPEG decode on the device (building demo:photos). The full
    rehearsal (all eight runs) is `QUICK_CPU=1 bash benchmarks/gpu_quick.sh`."""
    env = {**os.environ, "QUICK_CPU": "1", "OUT": str(tmp_path), "QUICK_DATA": str(data_cache),
           "QUICK_ONLY": "vit_eager,vit_zero3_compiled,loader_device", "QUICK_BUDGET": "1200"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_quick.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1300)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads((tmp_path / "gpu_quick.json").read_text())
    assert res["cpu_rehearsal"] and (tmp_path / "gpu_quick.log").is_file()
    rows = {row["row"]: row for row in res["rows"]}
    assert list(rows) == ["ViT-L/16 timm eager", "ViT-L/16 ours eager", "ViT-L/16 engine ZeRO-2 eager",
                          "loader step, decode on device", "ViT-L/16 engine ZeRO-3 compiled"]
    for label, row in rows.items():
        assert row["status"] == "ok" and row["error"] == "", row  # compiled for real: no fallback warning
        assert row["img_per_s"] > 0 and row["mfu"] is None, row  # no peak FLOP/s known for a CPU
    assert rows["ViT-L/16 ours eager"]["peak_gb"] > 0 and 0 <= rows["loader step, decode on device"]["data_wait_frac"] < 1
    for label in rows:
        assert label in r.stdout  # the one table
    cmd = " ".join(next(run["command"] for run in res["runs"] if run["name"] == "vit_zero3_compiled"))
    assert "bench --config configs/sup_vit_l16.yaml" in cmd and "engine.zero_stage=3" in cmd and "--compile" in cmd


def test_gpu_quick_table_keeps_failed_rows(tmp_path, monkeypatch, capsys):
    """A crash, a hang and a spent budget each become a row with its reason; the runs after them still run."""
    scripts = {"crash": "import sys; sys.exit('error: CUDA out of memory (tried to allocate 2 GiB)')",
               "hang": "import time; time.sleep(60)",
               "fine": "import json, sys; json.dump({'modes': {'engine': {'img_per_s': 5.0, 'mfu': 0.5, "
                       "'step_ms': 1.0, 'peak_mem_bytes': 2 ** 30}}}, open(sys.argv[1], 'w'))"}
    monkeypatch.setattr(quick, "command", lambda run, path, cpu: [sys.executable, "-c", scripts[run.name], str(path)])
    runs = [quick.Run(name, [], {"engine": f"row {name}"}, timeout_s=t) for name, t in
            (("crash", 30), ("hang", 1), ("fine", 30), ("skip", 30))]
    scripts["skip"] = scripts["fine"]
    with open(tmp_path / "log", "w") as log:
        outcomes = quick.run_all(runs[:3], tmp_path, cpu=False, budget_s=120, log=log)
        outcomes += quick.run_all(runs[3:], tmp_path, cpu=False, budget_s=5, log=log)  # too little left
    rows = {r["row"]: r for r in quick.table_rows(outcomes)}
    assert rows["row crash"]["status"] == "error" and "out of memory" in rows["row crash"]["error"]
    assert rows["row hang"]["status"] == "timeout"
    assert rows["row fine"]["status"] == "ok" and rows["row fine"]["img_per_s"] == 5.0
    assert rows["row fine"]["peak_gb"] == 1.0
    assert rows["row skip"]["status"] == "skipped" and "budget" in rows["row skip"]["error"]
    quick.print_rows(list(rows.values()), "header")
    assert "out of memory" in capsys.readouterr().out
