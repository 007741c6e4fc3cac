"""``vitscale plot RUN_DIR``: one PNG with loss, learning rate, throughput, MFU and data-wait over steps.

Reads ``RUN_DIR/metrics.jsonl`` (the trainer's log lines; the end-of-run ``val_*`` line is shown in the title).
A resumed run logs some steps twice; the later line wins, as it is the one the run continued from.
Headless: a matplotlib ``Figure`` on the Agg canvas, no pyplot state.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

from vitscale.logging.figures import new_figure, save_figure
from vitscale.logging.metrics import read_metrics

PANELS = [  # (metrics key, panel title, y label, scale)
    ("loss", "loss", "loss", 1.0),
    ("lr", "learning rate", "lr", 1.0),
    ("samples_per_s", "throughput", "samples/s", 1.0),
    ("mfu", "MFU", "% of peak FLOP/s", 100.0),
    ("data_wait_frac", "data wait", "% of step time", 100.0),
]


def _find_metrics(run: Union[str, Path]) -> Path:
    p = Path(run)
    if not p.exists():
        raise FileNotFoundError(f"run directory not found: {p}")
    if p.is_dir():
        if not (p / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"no metrics.jsonl in {p} (has the run logged a step yet?)")
        p = p / "metrics.jsonl"
    return p


def load_steps(path: Path) -> tuple[list[dict], dict]:
    """Training log lines (one per step, sorted, last one wins) and the merged evaluation values."""
    steps: dict[int, dict] = {}
    evals: dict[str, Any] = {}
    for rec in read_metrics(path):
        if "step" not in rec:
            raise ValueError(f"{path}: a line has no 'step'")
        if "loss" in rec:
            step = _whole(rec["step"])
            if step is not None:  # a step of [1], null or 1e999 is a damaged line: skipped as unreadable ones are
                steps[step] = {**rec, "step": step}
        else:
            evals.update({k: v for k, v in rec.items() if k.startswith("val_")})
    if not steps:
        raise ValueError(f"{path} has no training log lines (is the run older than its first log step?)")
    return [steps[k] for k in sorted(steps)], evals


def _whole(v: Any) -> Optional[int]:
    """A step as an int, or None when it is not a whole number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if isinstance(v, int) else int(v) if v.is_integer() else None


def _finite(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return f if math.isfinite(f) else None


def plot_run(run: Union[str, Path], out: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """Write the figure (default ``RUN_DIR/metrics.png``); returns ``{path, titles, steps, unavailable}``."""
    path = _find_metrics(run)
    records, evals = load_steps(path)
    out = Path(out) if out is not None else path.parent / "metrics.png"
    if not out.suffix:  # matplotlib appends .png to a name without one: name the file it really writes
        out = out.with_name(out.name + ".png")
    fig = new_figure(15, 3.4)
    axes = fig.subplots(1, len(PANELS))
    unavailable = []
    for ax, (key, title, ylabel, scale) in zip(axes, PANELS):
        pts = [(r["step"], _finite(r.get(key))) for r in records]
        pts = [(s, v * scale) for s, v in pts if v is not None]
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if not pts:
            unavailable.append(key)
            why = "n/a on this device" if key == "mfu" else "not logged"
            ax.text(0.5, 0.5, f"{title}: {why}", ha="center", va="center", transform=ax.transAxes, color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, linewidth=1.2)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    name = path.parent.name
    extra = "".join(f", {k} {_finite(v):.4g}" for k, v in evals.items()
                    if _finite(v) is not None and k != "val_images")
    fig.suptitle(f"{name}: {len(records)} log steps (last step {records[-1]['step']}){extra}")
    save_figure(fig, out)
    return {"path": str(out), "titles": [ax.get_title() for ax in axes], "steps": len(records),
            "unavailable": unavailable}
