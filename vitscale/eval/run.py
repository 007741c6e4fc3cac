"""``vitscale eval``: run one or more evaluations of a checkpoint and write ``<name>.json`` + PNGs per evaluation.

Evaluations: ``accuracy`` (the classifier's own top-1), ``linear``, ``knn``, ``fewshot`` (frozen features,
extracted once and shared) and ``robustness`` (fine-tuning is ``vitscale train`` with ``model.init``);
``probes`` = linear,knn,fewshot. Only the main process writes files and prints; every process computes (features
are gathered, counts summed).
"""
from __future__ import annotations

import copy
import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from vitscale.eval.features import (check_labels, data_specs, extract_features, load_encoder, make_accelerator,
                                    num_classes_of, reinit_, resolve_data)
from vitscale.eval.robustness import RobustnessConfig

EVALUATIONS = ("accuracy", "linear", "knn", "fewshot", "robustness")
# Fine-tuning is a mode of `vitscale train` (one training loop: ZeRO, resume, validation, augmentation).
FINETUNE_HINT = ("fine-tuning runs through `vitscale train`: vitscale train --config configs/demo_finetune.yaml "
                 "model.init=CKPT (recipes and options: docs/finetune.md)")
ALIASES = {"probes": ("linear", "knn", "fewshot"), "all": EVALUATIONS}
PROBES = ("linear", "knn", "fewshot")


@dataclass
class EvalOptions:
    """Everything ``vitscale eval`` can be told (the CLI's flags, one field each)."""

    data: Optional[str] = None
    val_data: Optional[str] = None
    cache_dir: Optional[str] = None  # None: the run's data.cache_dir (checkpoint dirs), else "data_cache"
    out: str = "eval"
    device: str = "auto"
    precision: str = "no"
    batch_size: int = 256
    num_workers: int = 0
    pool: str = "auto"
    seed: int = 0
    random_init: bool = False
    with_random_init: bool = False
    model_name: Optional[str] = None
    probe_epochs: int = 100
    probe_batch_size: int = 256
    probe_blr: float = 0.1
    probe_weight_decay: float = 0.0
    k: int = 20
    temperature: float = 0.07
    shots: Sequence[int] = (1, 5, 10, 25)
    fewshot_seeds: int = 5
    ridge_reg: float = 1e-3
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    baseline: str = "resnet18"
    baseline_ckpt: Optional[str] = None
    baseline_steps: Optional[int] = None
    baseline_batch_size: Optional[int] = None
    baseline_width: int = 64
    baseline_lr: float = 2e-3


def parse_evaluations(spec: str) -> list[str]:
    """"linear,knn" -> ["linear", "knn"]; aliases expand; unknown names are a one-line ValueError."""
    names: list[str] = []
    for raw in str(spec).split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name == "finetune":
            raise ValueError(FINETUNE_HINT)
        if name in ALIASES:
            names.extend(n for n in ALIASES[name] if n not in names)
        elif name in EVALUATIONS:
            if name not in names:
                names.append(name)
        else:
            close = difflib.get_close_matches(name, list(EVALUATIONS) + list(ALIASES), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"unknown evaluation {name!r}{hint} (choose from {', '.join(EVALUATIONS)}, "
                             f"or probes / all)")
    if not names:
        raise ValueError("no evaluation named (e.g. linear,knn,fewshot)")
    return [n for n in EVALUATIONS if n in names]  # a fixed order


def _model_summary(info: dict) -> dict:
    keys = ("path", "name", "objective", "part", "step", "init", "init_seed", "img_size", "patch_size", "embed_dim",
            "depth", "num_heads", "num_classes", "pos_embed_type", "params")
    return {k: info.get(k) for k in keys}


def _write_json(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_eval(evaluations: Sequence[str], ckpt: str, opts: EvalOptions, log=None) -> dict[str, dict]:
    """Run ``evaluations`` (names or aliases) on ``ckpt``; returns ``{name: the JSON document written}``."""
    names = parse_evaluations(",".join(evaluations) if not isinstance(evaluations, str) else evaluations)
    if opts.with_random_init and opts.random_init:
        raise ValueError("--random-init and --with-random-init exclude each other")
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    opts.robustness.validate()
    accelerator = make_accelerator(opts.device, opts.precision)
    say = (log or print) if accelerator.is_main_process else (lambda *a, **k: None)
    model, info = load_encoder(ckpt, accelerator.device, opts.random_init, opts.seed, opts.model_name)
    img_size = info["img_size"][0]
    cache_dir = opts.cache_dir or info["data_config"].get("cache_dir") or "data_cache"
    train_set, val_set = resolve_data(opts.data, opts.val_data, cache_dir, info)
    num_classes = num_classes_of(train_set, val_set)
    out = Path(opts.out)
    base = {"checkpoint": str(ckpt), "model": _model_summary(info),
            "data": dict(zip(("train", "val"), data_specs(opts.data, opts.val_data, info)),
                         num_classes=num_classes),
            "world_size": accelerator.num_processes, "device": str(accelerator.device), "precision": opts.precision,
            "options": options_dict(opts)}
    docs: dict[str, dict] = {}

    def emit(name: str, doc: dict) -> None:
        """Write each result as soon as it exists: a later evaluation that fails does not lose it."""
        docs[name] = doc
        if accelerator.is_main_process:
            say(f"wrote {_write_json(out / f'{name}.json', doc)}")

    summary: list[list[str]] = []
    tables: list[list[list[str]]] = []  # extra tables (robustness)
    label = "random init" if opts.random_init else "trained"

    if "accuracy" in names:
        from vitscale.eval.classify import evaluate_classifier, require_classifier

        require_classifier(model, "accuracy")
        res = evaluate_classifier(model, val_set, accelerator, img_size=img_size, batch_size=opts.batch_size)
        emit("accuracy", {"evaluation": "accuracy", **base, "results": {label: res}})
        summary.append(["accuracy", "top-1 (%)", _pct(res["val_acc"])])

    probes = [n for n in names if n in PROBES]
    if probes:
        variants = {label: model}
        if opts.with_random_init:
            variants["random init"] = reinit_(copy.deepcopy(model), opts.seed)
        for name, doc in _run_probes(probes, variants, train_set, val_set, num_classes, img_size, accelerator,
                                     opts, info, base, summary, say).items():
            emit(name, doc)

    if "robustness" in names:
        from vitscale.eval.robust_run import run_robustness

        emit("robustness", run_robustness(model, info, train_set, val_set, num_classes, img_size, accelerator,
                                          opts, base, tables, say))

    if accelerator.is_main_process:
        say(f"\nsummary: {info['name']} ({info['objective']}, step {info['step']}) from {ckpt}")
        if summary:
            width = max(len(r) for r in summary)
            rows = [r + [""] * (width - len(r)) for r in summary]
            header = ["evaluation", "metric", label] + (["random init"] if opts.with_random_init else [])
            header += [""] * (width - len(header))
            say(format_table([header[:width]] + rows))
        for table in tables:
            say("\nrobustness (ViT vs CNN baseline, mean over random draws):")
            say(format_table(table))
    accelerator.wait_for_everyone()
    return docs


def _run_probes(probes: list[str], variants: dict, train_set, val_set, num_classes: int, img_size: int, accelerator,
                opts: EvalOptions, info: dict, base: dict, summary: list, say) -> dict[str, dict]:
    from vitscale.eval import plots
    from vitscale.eval.probes import fewshot_eval, knn_eval, linear_probe

    pool = opts.pool if opts.pool != "auto" else ("avg" if info["objective"] == "mae" else "model")
    results: dict[str, dict[str, Any]] = {p: {} for p in probes}
    sizes = {}
    for variant, model in variants.items():
        feats = {split: extract_features(model, shards, accelerator, img_size=img_size, batch_size=opts.batch_size,
                                         pool=pool, num_workers=opts.num_workers)
                 for split, shards in (("train", train_set), ("val", val_set))}
        check_labels(feats["train"].labels, "training shards")
        check_labels(feats["val"].labels, "held-out shards")
        sizes = {"train_samples": len(feats["train"]), "val_samples": len(feats["val"]),
                 "feature_dim": int(feats["train"].features.shape[1])}
        if "linear" in probes:
            results["linear"][variant] = linear_probe(
                feats["train"], feats["val"], num_classes, epochs=opts.probe_epochs, batch_size=opts.probe_batch_size,
                blr=opts.probe_blr, weight_decay=opts.probe_weight_decay, seed=opts.seed, device=accelerator.device)
        if "knn" in probes:
            results["knn"][variant] = knn_eval(feats["train"], feats["val"], num_classes, k=opts.k,
                                               temperature=opts.temperature, device=accelerator.device)
        if "fewshot" in probes:
            results["fewshot"][variant] = fewshot_eval(feats["train"], feats["val"], num_classes, shots=opts.shots,
                                                       seeds=opts.fewshot_seeds, reg=opts.ridge_reg)
        say(f"{variant}: " + ", ".join(f"{p} {_pct(_headline(p, results[p][variant]))}%" for p in probes))
    docs = {}
    out = Path(opts.out)
    title = f"{info['name']} ({info['objective']}, step {info['step']}), {pool} features"
    for p in probes:
        docs[p] = {"evaluation": p, **base, "data": {**base["data"], **sizes}, "pool": pool, "results": results[p]}
        row = [p, {"linear": "top-1 (%)", "knn": f"top-1 (%), k={opts.k}, T={opts.temperature}",
                   "fewshot": ""}[p]]
        if p == "fewshot":
            for i, shots in enumerate(next(iter(results[p].values()))["shots"]):
                summary.append([p, f"{shots}-shot top-1 (%)"] + [
                    f"{_pct(r['mean'][i])} ± {_pct(r['std'][i])}" for r in results[p].values()])
        else:
            summary.append(row + [_pct(r["val_acc"]) for r in results[p].values()])
        if accelerator.is_main_process:
            plot = {"linear": plots.plot_linear, "knn": plots.plot_knn, "fewshot": plots.plot_fewshot}[p]
            say(f"wrote {plot(results[p], out / f'{p}.png', f'{p}: {title}')}")
    return docs


def _headline(probe: str, result: dict) -> float:
    return result["mean"][-1] if probe == "fewshot" else result["val_acc"]


def options_dict(opts: EvalOptions) -> dict:
    d = asdict(opts)
    return json.loads(json.dumps(d, default=list))
