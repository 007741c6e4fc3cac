"""The driver of ``benchmarks/gpu_quick.sh``: every GPU figure issue 18 asks for, in one bounded run, as one table.

Each measurement is a plain ``python -m vitscale bench ...`` subprocess with its own timeout (and a shared time
budget), so a crash, an OOM or a hang costs that row, never the table: the row then holds the error. Rows:
ViT-L/16 bf16 batch 128 on synthetic data - timm eager, ours eager and compiled, the engine at ZeRO-2 and ZeRO-3
eager and compiled; the MAE ViT-L/16 engine step at batch 256; the real loader step on ``demo:photos`` with
``data.decode_on=worker`` and ``device``. Each row: img/s, MFU, peak GB (torch.cuda.max_memory_allocated).

``QUICK_CPU=1`` (the rehearsal the tests run) uses the same configs, commands and table with a tiny model, one
step per round and generous timeouts, so the script cannot break unseen before a GPU window.

    python3 benchmarks/quick.py [--out DIR] [--budget SECONDS] [--only NAME,...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the runs name its configs/ by relative path
# representation_size=null: timm's ViT has no pre-logits layer to compare with (the recipe's is 0.1% of the FLOPs)
VIT = ["--config", "configs/sup_vit_l16.yaml", "model.grad_checkpointing=false", "model.drop_path=0.0",
       "model.representation_size=null", "data.batch_size=128"]
MAE = ["--config", "configs/mae_vit_l16.yaml", "model.grad_checkpointing=false", "data.batch_size=256"]
# demo:photos has 8 shards, one per reader: 8 workers (12 stopped with "8 shards cannot feed 12 readers")
LOADER = [*VIT, "data.train_shards=demo:photos", "data.num_workers=8", "--what", "step", "--no-timm"]
GPU_STEPS = ["--iters", "10", "--warmup", "3", "--rounds", "2"]
# QUICK_CPU=1: the same runs with a tiny model (the rehearsal); appended after each run's own overrides.
CPU_TINY = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.img_size=32", "data.batch_size=8",
            "data.num_workers=1", "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]
CPU_STEPS = ["--iters", "1", "--warmup", "1", "--rounds", "1", "--threads", "1"]


@dataclass
class Run:
    """One ``vitscale bench`` process; ``rows`` maps its result modes to table rows."""
    name: str
    args: list[str]
    rows: dict[str, str]
    timeout_s: int
    compiled: bool = False


RUNS = [  # in priority order: if the budget runs out, the last rows are the ones skipped (eager rows first:
    # they need no compile time, and every target's baseline is among them)
    Run("vit_eager", [*VIT, "--what", "model,engine"],
        {"timm": "ViT-L/16 timm eager", "model": "ViT-L/16 ours eager", "engine": "ViT-L/16 engine ZeRO-2 eager"}, 120),
    Run("vit_zero3", [*VIT, "engine.zero_stage=3", "--what", "engine"], {"engine": "ViT-L/16 engine ZeRO-3 eager"}, 90),
    Run("mae", [*MAE, "--what", "model,engine"],
        {"timm": "MAE ViT-L/16 b256 timm-block eager", "model": "MAE ViT-L/16 b256 ours eager",
         "engine": "MAE ViT-L/16 b256 engine eager"}, 100),
    Run("loader_device", [*LOADER, "data.decode_on=device"], {"step": "loader step, decode on device"}, 100),
    Run("loader_worker", [*LOADER, "data.decode_on=worker"], {"step": "loader step, decode on workers"}, 100),
    Run("vit_compiled", [*VIT, "--what", "model,engine", "--compile"],
        {"timm": "ViT-L/16 timm compiled", "model": "ViT-L/16 ours compiled",
         "engine": "ViT-L/16 engine ZeRO-2 compiled"}, 240, compiled=True),
    Run("vit_zero3_compiled", [*VIT, "engine.zero_stage=3", "--what", "engine", "--compile"],
        {"engine": "ViT-L/16 engine ZeRO-3 compiled"}, 120, compiled=True),
    Run("mae_compiled", [*MAE, "--what", "engine", "--compile"], {"engine": "MAE ViT-L/16 b256 engine compiled"},
        150, compiled=True),
]


@dataclass
class Outcome:
    run: Run
    status: str  # "ok", "error", "timeout", "skipped"
    seconds: float = 0.0
    result: Optional[dict] = None
    error: str = ""
    log_tail: list[str] = field(default_factory=list)


def command(run: Run, json_path: Path, cpu: bool) -> list[str]:
    """The exact command line of one run (also what the table's JSON records)."""
    data = os.environ.get("QUICK_DATA", "/tmp/vitscale_quick_data")  # demo:photos shards, built on first use
    overrides = [a for a in run.args if "=" in a and not a.startswith("-")]
    options = [a for a in run.args if a not in overrides]  # --config X, --what Y, flags
    if "data.train_shards=demo:photos" in overrides:
        overrides.append(f"data.cache_dir={data}")
    if cpu:
        overrides, options = [*overrides, *CPU_TINY], [*options, *CPU_STEPS]
    else:
        options = [*options, *GPU_STEPS]
    # the overrides right after --config: the bench parser takes its positional key=value list in one piece
    i = options.index("--config") + 2
    return [sys.executable, "-m", "vitscale", "bench", *options[:i], *overrides, *options[i:], "--json",
            str(json_path)]


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):  # the exception line of a traceback, or vitscale's one-line error
        if ln.startswith(("error:", "torch.OutOfMemoryError", "RuntimeError", "ValueError")) or "Error:" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def execute(run: Run, work: Path, cpu: bool, timeout_s: float, log) -> Outcome:
    json_path = work / f"{run.name}.json"
    json_path.unlink(missing_ok=True)
    cmd = command(run, json_path, cpu)
    log.write(f"=== {run.name}: {' '.join(cmd[1:])}\n")
    log.flush()
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                           env={**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log.write(out + f"\n=== {run.name}: timeout after {timeout_s:.0f} s\n")
        return Outcome(run, "timeout", time.monotonic() - t0, error=f"timeout after {timeout_s:.0f} s")
    seconds = time.monotonic() - t0
    log.write(p.stdout + p.stderr + f"\n=== {run.name}: exit {p.returncode} after {seconds:.0f} s\n")
    log.flush()
    if p.returncode != 0 or not json_path.is_file():
        return Outcome(run, "error", seconds, error=_error_line(p.stderr or p.stdout))
    result = json.loads(json_path.read_text())
    warned = "torch.compile failed" in p.stderr
    return Outcome(run, "ok", seconds, result=result, error="compile fell back to eager" if warned else "")


def run_all(runs: list[Run], work: Path, cpu: bool, budget_s: float, log) -> list[Outcome]:
    """Run in order; each gets its own timeout, cut to what is left of the budget (none: skipped)."""
    start, out = time.monotonic(), []
    for run in runs:
        left = budget_s - (time.monotonic() - start)
        timeout = min(run.timeout_s * (3 if cpu else 1), left)
        if left < (20 if cpu else 30):  # too little left for any run to finish
            out.append(Outcome(run, "skipped", error=f"time budget ({budget_s:.0f} s) spent"))
            continue
        out.append(execute(run, work, cpu, timeout, log))
        print(f"{run.name}: {out[-1].status} ({out[-1].seconds:.0f} s) {out[-1].error}", flush=True)
    return out


def table_rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    rows = []
    for o in outcomes:
        for mode, label in o.run.rows.items():
            row: dict[str, Any] = {"row": label, "run": o.run.name, "status": o.status, "error": o.error,
                                   "img_per_s": None, "mfu": None, "peak_gb": None, "step_ms": None}
            m = (o.result or {}).get("modes", {}).get(mode)
            if m is not None:
                row.update(img_per_s=m["img_per_s"], mfu=m["mfu"], step_ms=m["step_ms"],
                           peak_gb=m["peak_mem_bytes"] / 2 ** 30 if m.get("peak_mem_bytes") else None)
                if "data_wait_frac" in m:
                    row["data_wait_frac"] = m["data_wait_frac"]
            elif o.status == "ok":
                row.update(status="error", error=f"no '{mode}' result in {o.run.name}")
            rows.append(row)
    return rows


def print_rows(rows: list[dict[str, Any]], header: str) -> None:
    from vitscale.bench.common import fmt_num, print_table

    print(header)
    cells = []
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        note = r["error"][:100] or ("" if "data_wait_frac" not in r else f"data wait {100 * r['data_wait_frac']:.0f}%")
        cells.append([r["row"], fmt_num(r["img_per_s"]), mfu, fmt_num(r["peak_gb"], ".2f"), r["status"], note])
    print_table(["measurement", "img/s", "MFU", "peak GB", "status", "notes"], cells)


def _versions() -> dict[str, str]:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("deepspeed", "timm"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 (a missing package is a row error, not a reason to stop)
            out[name] = "missing"
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 benchmarks/quick.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for gpu_quick.json and the log")
    ap.add_argument("--work", default=None, help="folder for each run's JSON (default: OUT or a temp folder)")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("QUICK_BUDGET", 300)),
                    help="seconds for all runs together (default 300; QUICK_BUDGET)")
    ap.add_argument("--only", default=os.environ.get("QUICK_ONLY", ""), help="comma-separated run names")
    args = ap.parse_args(argv)
    cpu = os.environ.get("QUICK_CPU", "") not in ("", "0")
    runs = [r for r in RUNS if not args.only or r.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {r.name for r in RUNS}
    if unknown:
        raise SystemExit(f"error: unknown run(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(r.name for r in RUNS)}")
    import tempfile

    out = Path(args.out) if args.out else None
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_quick_"))
    work.mkdir(parents=True, exist_ok=True)
    log_path = (out or work) / "gpu_quick.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        outcomes = run_all(runs, work, cpu, args.budget, log)
    rows = table_rows(outcomes)
    versions = _versions()
    header = (f"gpu_quick ({'CPU rehearsal, tiny model' if cpu else 'ViT-L/16 224px bf16'}) on {versions['device']}: "
              f"torch {versions['torch']}, deepspeed {versions['deepspeed']}, {time.monotonic() - t0:.0f} s")
    print_rows(rows, header)
    payload = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpu_rehearsal": cpu,
               "versions": versions, "budget_s": args.budget, "seconds": time.monotonic() - t0, "rows": rows,
               "runs": [{"name": o.run.name, "status": o.status, "seconds": o.seconds, "error": o.error,
                         "command": command(o.run, work / f"{o.run.name}.json", cpu)[1:]} for o in outcomes]}
    if out is not None:
        (out / "gpu_quick.json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out / 'gpu_quick.json'} and {log_path}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
