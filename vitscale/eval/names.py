"""The evaluations `vitscale eval` runs, by name, and their aliases: light to import (`vitscale sweep` checks its
--eval names with them before any cell trains)."""
from __future__ import annotations

import difflib

EVALUATIONS = ("accuracy", "linear", "knn", "fewshot", "robustness")
# Fine-tuning is a mode of `vitscale train` (one training loop: ZeRO, resume, validation, augmentation).
FINETUNE_HINT = ("fine-tuning runs through `vitscale train`: vitscale train --config configs/demo_finetune.yaml "
                 "model.init=CKPT (recipes and options: docs/finetune.md)")
ALIASES = {"probes": ("linear", "knn", "fewshot"), "all": EVALUATIONS}
PROBES = ("linear", "knn", "fewshot")


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
