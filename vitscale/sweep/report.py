"""A sweep's table: one row per grid point, mean +- std over seeds of every metric; JSON, Markdown and a plot."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from vitscale.logging.figures import new_figure, save_figure
from vitscale.logging.metrics import mean_std

# Shown first, in this order, when present; every other metric follows alphabetically.
PREFERRED = ("val_top1", "val_top5", "val_loss", "train_loss")
HIDDEN = ("steps", "val_images")


def _natural(name: str) -> list:
    """Sort key that puts fewshot/5-shot before fewshot/10-shot."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def summarize(results: Sequence[dict]) -> dict:
    """``{"metrics": [...], "rows": [{group, params, n, seeds, <metric>: {mean, std, n}}], "failed": [...]}``."""
    ok = [r for r in results if r.get("status") == "ok"]
    names = sorted({k for r in ok for k in r["metrics"] if k not in HIDDEN}, key=_natural)
    metrics = [m for m in PREFERRED if m in names] + [m for m in names if m not in PREFERRED]
    rows: dict[str, dict] = {}
    for r in results:  # grid order: rows come out in the order the grid defines
        row = rows.setdefault(r["group"], {"group": r["group"], "params": r["params"], "seeds": [], "n": 0})
        if r.get("status") == "ok":
            row["seeds"].append(r["seed"])
            row["n"] += 1
    for row in rows.values():
        for m in metrics:
            values = [r["metrics"][m] for r in ok if r["group"] == row["group"] and m in r["metrics"]]
            if values:
                row[m] = mean_std(values)
    failed = [{"name": r["name"], "error": r.get("error", "")} for r in results if r.get("status") == "failed"]
    pending = [r["name"] for r in results if r.get("status") not in ("ok", "failed")]
    return {"metrics": metrics, "rows": list(rows.values()), "failed": failed, "pending": pending}


def format_cell(stat: dict | None) -> str:
    if not stat:
        return "-"
    if stat["n"] == 1:
        return f"{stat['mean']:.4g}"
    return f"{stat['mean']:.4g} ± {stat['std']:.2g}"


def markdown(summary: dict, title: str) -> str:
    metrics = summary["metrics"]
    lines = [f"# {title}", "", "mean ± std over seeds (sample std; n = seeds that finished)", "",
             "| grid point | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for row in summary["rows"]:
        lines.append(f"| {row['group']} | {row['n']} | " + " | ".join(format_cell(row.get(m)) for m in metrics)
                     + " |")
    if summary.get("pending"):
        lines += ["", f"{len(summary['pending'])} cells not run yet (other --shard processes, or interrupted)"]
    if summary["failed"]:
        lines += ["", "## Failed cells", ""] + [f"- `{f['name']}`: {f['error']}" for f in summary["failed"]]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str, metrics: Sequence[str] = (), max_metrics: int = 4) -> Path | None:
    """One bar chart per metric (``metrics`` that the table has, else its first ``max_metrics``), error bars =
    std over seeds."""
    metrics = [m for m in metrics if m in summary["metrics"]] or summary["metrics"][:max_metrics]
    rows = [r for r in summary["rows"] if r["n"]]
    if not metrics or not rows:
        return None
    fig = new_figure(3.2 * len(metrics) + 1, 3.6, dpi=110)
    axes = fig.subplots(1, len(metrics), squeeze=False)
    labels = [r["group"].replace(", ", "\n") for r in rows]
    for ax, m in zip(axes[0], metrics):
        means = [r[m]["mean"] if m in r else float("nan") for r in rows]
        stds = [r[m]["std"] if m in r else 0.0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_title(m, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def write_report(summary: dict, out: Path, header: dict, plot_metrics: Sequence[str] = ()) -> list[Path]:
    """``sweep.json``, ``sweep.md`` and ``sweep.png`` (of ``plot_metrics``) in ``out``; returns the paths written."""
    title = f"sweep of {header.get('config', '?')}"
    json_path, md_path = out / "sweep.json", out / "sweep.md"
    json_path.write_text(json.dumps({**header, **summary}, indent=1) + "\n")
    md_path.write_text(markdown(summary, title))
    written = [json_path, md_path]
    png = plot(summary, out / "sweep.png", title, plot_metrics)
    return written + ([png] if png else [])
