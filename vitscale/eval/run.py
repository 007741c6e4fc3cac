"""``vitscale eval``: run one or more evaluations of a checkpoint and write ``<name>.json`` + PNGs per evaluation.

Evaluations: ``accuracy`` (the classifier's own top-1), ``linear``, ``knn``, ``fewshot`` (frozen features,
extracted once and shared) and ``robustness`` (fine-tuning is ``vitscale train`` with ``model.init``);
``probes`` = linear,knn,fewshot. Only the main
process writes files and prints; every process computes (features are gathered, counts summed).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vitscale.data.shards import head_classes
from vitscale.data.transforms import EvalTransform
from vitscale.eval import plots
from vitscale.eval.classify import evaluate_classifier, require_classifier
from vitscale.eval.features import (check_labels, data_specs, extract_features, load_encoder, make_accelerator,
    reinit_, resolve_data)
from vitscale.eval.names import PROBES, parse_evaluations
from vitscale.eval.probes import RIDGE_REG, check_k, fewshot_eval, knn_eval, linear_probe
from vitscale.eval.robust_run import run_robustness
from vitscale.eval.robustness import RobustnessConfig, check_image_size
from vitscale.objectives import objective_class
from vitscale.weights.outfile import check_folder_path

__all__ = ["EvalOptions", "parse_evaluations", "run_eval"]  # parse_evaluations lives in eval/names.py


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
    num_heads: Optional[int] = None  # a timm file's head count, where --model's variant has another width
    crop_pct: Optional[float] = None  # None: the run's data.eval_crop_pct (else 0.875)
    interpolation: Optional[str] = None  # None: the run's data.interpolation (else bilinear)
    probe_epochs: int = 100
    probe_batch_size: int = 256
    probe_blr: float = 0.1
    probe_weight_decay: float = 0.0
    k: int = 20
    temperature: float = 0.07
    shots: Sequence[int] = (1, 5, 10, 25)
    fewshot_seeds: int = 5
    ridge_reg: float = RIDGE_REG
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    baseline: str = "resnet18"
    baseline_ckpt: Optional[str] = None
    baseline_steps: Optional[int] = None
    baseline_batch_size: Optional[int] = None
    baseline_width: Optional[int] = None  # None: sized to the ViT's parameter count
    baseline_lr: float = 2e-3


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


@dataclass
class _Session:
    """What the evaluations of one ``run_eval`` call share: the model, its data, the JSON header every document
    starts with (``base``), and what they add to: the documents, the summary rows, the extra tables."""

    ckpt: str
    opts: EvalOptions
    accelerator: Any
    say: Callable[..., None]
    model: Any
    info: dict
    train_set: Any
    val_set: Any
    num_classes: int
    base: dict
    docs: dict[str, dict] = field(default_factory=dict)
    summary: list[list[str]] = field(default_factory=list)
    tables: list[list[list[str]]] = field(default_factory=list)  # extra tables (robustness)

    @property
    def img_size(self) -> int:
        return self.info["img_size"][0]

    @property
    def view(self) -> EvalTransform:
        """The held-out images' transform: the training run's, unless the options say otherwise."""
        run = EvalTransform.of_run(self.info.get("data_config") or {})
        return EvalTransform(self.opts.crop_pct or run.crop_pct, self.opts.interpolation or run.interpolation)

    @property
    def label(self) -> str:
        return "random init" if self.opts.random_init else "trained"

    @property
    def out(self) -> Path:
        return Path(self.opts.out)

    def emit(self, name: str, doc: dict) -> None:
        """Write each result as soon as it exists: a later evaluation that fails does not lose it."""
        self.docs[name] = doc
        if self.accelerator.is_main_process:
            self.say(f"wrote {_write_json(self.out / f'{name}.json', doc)}")


def run_eval(evaluations: Sequence[str], ckpt: str, opts: EvalOptions, log=None) -> dict[str, dict]:
    """Run ``evaluations`` (names or aliases) on ``ckpt``; returns ``{name: the JSON document written}``."""
    names = parse_evaluations(",".join(evaluations) if not isinstance(evaluations, str) else evaluations)
    _check_options(ckpt, opts)
    s = _open_session(ckpt, opts, log)
    for name in ("accuracy", "robustness"):  # before the probes' minutes, not after them
        if name in names:
            require_classifier(s.model, name, s.num_classes)
    if "robustness" in names:  # its grids against the image size, before `eval all` runs the probes
        rob = opts.robustness
        check_image_size(rob, s.img_size, rob.occlusion_grid if rob.occlusion_grid is not None else
                         s.info["grid_size"][0])
    if "accuracy" in names:
        _accuracy(s)
    probes = [n for n in names if n in PROBES]
    if probes:
        _probes(s, probes)
    if "robustness" in names:
        s.emit("robustness", run_robustness(s.model, s.info, s.train_set, s.val_set, s.num_classes, s.img_size,
                                            s.accelerator, opts, s.base, s.tables, s.say, view=s.view))
    if s.accelerator.is_main_process:
        _print_summary(s)
    s.accelerator.wait_for_everyone()
    return s.docs


def _check_options(ckpt: str, opts: EvalOptions) -> None:
    """Every option error before any work."""
    if opts.with_random_init and opts.random_init:
        raise ValueError("--random-init and --with-random-init exclude each other")
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    check_folder_path(Path(opts.out), "--out")  # the first file is written after minutes of evaluation
    opts.robustness.validate()


def _open_session(ckpt: str, opts: EvalOptions, log) -> _Session:
    """The accelerator, the model under evaluation and its labelled data."""
    accelerator = make_accelerator(opts.device, opts.precision)
    say = (log or print) if accelerator.is_main_process else (lambda *a, **k: None)
    model, info = load_encoder(ckpt, accelerator.device, opts.random_init, opts.seed, opts.model_name,
                               opts.num_heads)
    cache_dir = opts.cache_dir or info["data_config"].get("cache_dir") or "data_cache"
    train_set, val_set = resolve_data(opts.data, opts.val_data, cache_dir, info)
    num_classes = head_classes(None, train_set, val_set)[0]  # the trainer's rule; an evaluation has no data.* keys
    if not num_classes:
        raise ValueError("no labels: the shard manifests list no classes; this evaluation needs labelled shards "
                         "written with a manifest (vitscale make-shards)")
    base = {"checkpoint": str(ckpt), "model": _model_summary(info),
            "data": dict(zip(("train", "val"), data_specs(opts.data, opts.val_data, info)),
                         num_classes=num_classes),
            "world_size": accelerator.num_processes, "device": str(accelerator.device), "precision": opts.precision,
            "options": options_dict(opts)}
    return _Session(ckpt, opts, accelerator, say, model, info, train_set, val_set, num_classes, base)


def _accuracy(s: _Session) -> None:
    require_classifier(s.model, "accuracy", s.num_classes)
    res = evaluate_classifier(s.model, s.val_set, s.accelerator, img_size=s.img_size, batch_size=s.opts.batch_size,
                              view=s.view)
    s.emit("accuracy", {"evaluation": "accuracy", **s.base, "results": {s.label: res}})
    s.summary.append(["accuracy", "top-1 (%)", _pct(res["val_top1"])])


def _print_summary(s: _Session) -> None:
    s.say(f"\nsummary: {s.info['name']} ({s.info['objective']}, step {s.info['step']}) from {s.ckpt}")
    if s.summary:
        width = max(len(r) for r in s.summary)
        rows = [r + [""] * (width - len(r)) for r in s.summary]
        header = ["evaluation", "metric", s.label] + (["random init"] if s.opts.with_random_init else [])
        header += [""] * (width - len(header))
        s.say(format_table([header[:width]] + rows))
    for table in s.tables:
        s.say("\nrobustness (ViT vs CNN baseline, mean over random draws):")
        s.say(format_table(table))


# ----- frozen-feature probes: features extracted once per variant, shared by linear, knn and fewshot ----------
def _probes(s: _Session, probes: list[str]) -> None:
    variants = {s.label: s.model}
    if s.opts.with_random_init:
        variants["random init"] = reinit_(copy.deepcopy(s.model), s.opts.seed)
    pool = s.opts.pool if s.opts.pool != "auto" else objective_class(s.info["objective"]).probe_pool
    results: dict[str, dict[str, Any]] = {p: {} for p in probes}
    sizes: dict[str, int] = {}
    for variant, model in variants.items():
        feats = _features(s, model, pool)
        if "knn" in probes:  # before the linear probe's minutes, not after them
            check_k(s.opts.k, len(feats["train"]))
        sizes = {"train_samples": len(feats["train"]), "val_samples": len(feats["val"]),
                 "feature_dim": int(feats["train"].features.shape[1])}
        for p in probes:
            results[p][variant] = _probe(s, p, feats)
        s.say(f"{variant}: " + ", ".join(f"{p} {_pct(_headline(p, results[p][variant]))}%" for p in probes))
    title = f"{s.info['name']} ({s.info['objective']}, step {s.info['step']}), {pool} features"
    for p in probes:
        s.emit(p, {"evaluation": p, **s.base, "data": {**s.base["data"], **sizes}, "pool": pool,
                   "results": results[p]})
        s.summary.extend(_probe_rows(p, results[p], s.opts))
        if s.accelerator.is_main_process:
            plot = {"linear": plots.plot_linear, "knn": plots.plot_knn, "fewshot": plots.plot_fewshot}[p]
            s.say(f"wrote {plot(results[p], s.out / f'{p}.png', f'{p}: {title}')}")


def _features(s: _Session, model, pool: str) -> dict:
    feats = {split: extract_features(model, shards, s.accelerator, img_size=s.img_size,
                                     batch_size=s.opts.batch_size, pool=pool, num_workers=s.opts.num_workers,
                                     view=s.view)
             for split, shards in (("train", s.train_set), ("val", s.val_set))}
    check_labels(feats["train"].labels, "training shards")
    check_labels(feats["val"].labels, "held-out shards")
    return feats


def _probe(s: _Session, probe: str, feats: dict) -> dict:
    opts, train, val = s.opts, feats["train"], feats["val"]
    if probe == "linear":
        return linear_probe(train, val, s.num_classes, epochs=opts.probe_epochs, batch_size=opts.probe_batch_size,
                            blr=opts.probe_blr, weight_decay=opts.probe_weight_decay, seed=opts.seed,
                            device=s.accelerator.device)
    if probe == "knn":
        return knn_eval(train, val, s.num_classes, k=opts.k, temperature=opts.temperature,
                        device=s.accelerator.device)
    return fewshot_eval(train, val, s.num_classes, shots=opts.shots, seeds=opts.fewshot_seeds, reg=opts.ridge_reg)


def _probe_rows(probe: str, results: dict, opts: EvalOptions) -> list[list[str]]:
    """Summary rows of one probe, one column per variant."""
    if probe == "fewshot":
        shots = next(iter(results.values()))["shots"]
        return [[probe, f"{n}-shot top-1 (%), sample std n={opts.fewshot_seeds}"] + [
            f"{_pct(r['mean'][i])} ± {_pct(r['std'][i])}" for r in results.values()] for i, n in enumerate(shots)]
    metric = "top-1 (%)" if probe == "linear" else f"top-1 (%), k={opts.k}, T={opts.temperature}"
    return [[probe, metric] + [_pct(r["val_top1"]) for r in results.values()]]


def _headline(probe: str, result: dict) -> float:
    return result["mean"][-1] if probe == "fewshot" else result["val_top1"]


def options_dict(opts: EvalOptions) -> dict:
    d = asdict(opts)
    return json.loads(json.dumps(d, default=list))
