"""Fit a source state dict onto a target model: map the key layouts, resample the position table, and decide,
tensor by tensor, what is loaded, what starts fresh and what is dropped -- or refuse with one line.

Key layouts. vitscale's ViT and timm's use the same keys. vitscale's MAE holds its encoder under ``encoder.``;
the MAE release holds the encoder keys unprefixed beside ``decoder_*`` and ``mask_token``. Both are brought to one
*canonical* layout first: encoder keys unprefixed, decoder keys as they are.

Tolerated differences (each reported): the decoder and mask token dropped (ViT target) or started fresh (MAE
target without them in the source); the classifier head started fresh when the source has none or another class
count (or dropped when the target has none); MAE-style pooling (``fc_norm`` fresh, the source's final ``norm``
dropped, as MAE fine-tuning does) and the reverse; the head's BatchNorm statistics; ``pos_embed`` resampled to the
target's patch grid -- or, for a fixed sin-cos table (an MAE's), the target's own exact table kept; timm's
``no_embed_class`` table padded with zero rows for the prefix tokens. Anything else missing, unexpected or of another
shape is a :class:`WeightsError` (a width, class token or register count that differs named first).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from vitscale.models.pos_embed import resize_pos_embed
from vitscale.objectives.mae import DECODER_RE  # the MAE's own tensors: one definition, the objective's
from vitscale.weights.sources import WeightsError

HEAD_RE = re.compile(r"^head\.(weight|bias)$")
HEAD_NORM_RE = re.compile(r"^head_norm\.")
NORM_RE = re.compile(r"^(fc_norm|norm)\.(weight|bias)$")
MAX_NAMED = 6  # keys named in an error line


def canonical(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vitscale MAE (``encoder.*``), MAE release and timm/vitscale ViT layouts -> encoder keys unprefixed."""
    return {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in sd.items()}


def encoder_of(model: nn.Module) -> nn.Module:
    """The ViT that sees the images: the model itself, or an MAE's encoder."""
    return getattr(model, "encoder", model)


def target_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Canonical key -> logical shape of every tensor the model saves (``ds_shape`` under ZeRO-3's zero.Init)."""
    return {k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in canonical(model.state_dict(keep_vars=True)).items()}


def to_model_keys(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical keys -> the model's own (``encoder.`` prefix for an MAE's encoder tensors)."""
    if encoder_of(model) is model:
        return dict(sd)
    return {k if DECODER_RE.match(k) else "encoder." + k: v for k, v in sd.items()}


@dataclass
class Fit:
    """What a source contributes to a target: ``state_dict`` (canonical keys) and the notes for the report."""
    state_dict: dict[str, torch.Tensor]
    fresh: list[str] = field(default_factory=list)  # target keys that keep the model's own initialisation
    notes: list[str] = field(default_factory=list)


def _grid_of(n: int, what: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise WeightsError(f"{what}: {n} patch positions do not form a square grid; cannot resample")
    return side, side


def resample_pos_embed(table: torch.Tensor, target_shape: tuple[int, ...], num_prefix_tokens: int,
                       new_grid: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """A (1, prefix + h*w, D) table resampled to ``new_grid`` (2-D bicubic, antialiased, prefix rows kept)."""
    if table.ndim != 3 or table.shape[-1] != target_shape[-1]:
        raise WeightsError(f"pos_embed: source shape {tuple(table.shape)} cannot become {target_shape} "
                           f"(another width)")
    old_grid = _grid_of(table.shape[1] - num_prefix_tokens, "pos_embed")
    out = resize_pos_embed(table.float(), new_grid, num_prefix_tokens, old_grid=old_grid).to(table.dtype)
    return out, f"pos_embed resampled {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]}"


def _head_note(target: dict, source: dict) -> Optional[str]:
    t, s = target.get("head.weight"), source.get("head.weight")
    if t is None and s is None:
        return None
    if t is None:
        return f"head dropped (the model has none; source had {s.shape[0]} classes)"
    if s is None:
        return f"head initialised ({t[0]} classes; none in the source)"
    if tuple(s.shape) != t:
        return f"head re-initialised ({t[0]} classes; source had {s.shape[0]})"
    return None


def _fit_pre_logits(target: dict, src: dict, fit: Fit) -> tuple[dict, Optional[str]]:
    """The ViT paper's pre-training head (a pre-logits layer, then the classifier) into a model without one: both
    are dropped, as the paper fine-tunes with "the whole head (two layers)" replaced by one fresh layer; a
    pre-logits layer the source lacks starts fresh. Returns the source left and the head's note, if any."""
    pre = [k for k in src if k.startswith("pre_logits.")]
    wanted = [k for k in target if k.startswith("pre_logits.")]
    if pre and not wanted:
        src = {k: v for k, v in src.items() if k not in pre and not HEAD_RE.match(k)}
        return src, "pre-logits layer and head dropped (the ViT paper fine-tunes with one new layer in their place)"
    if wanted and not pre:
        fit.notes.append("pre-logits layer initialised (none in the source)")
        fit.fresh += wanted
    return src, None


def fit_state_dict(model: nn.Module, source: dict[str, torch.Tensor], what: str = "weights") -> Fit:
    """Decide how ``source`` (any supported layout) initialises ``model``; raise one line if it cannot."""
    src = canonical(source)
    target = target_shapes(model)
    enc = encoder_of(model)
    fit = Fit({})
    decoder = sorted(k for k in src if DECODER_RE.match(k))
    if decoder and not any(DECODER_RE.match(k) for k in target):
        fit.notes.append(f"decoder and mask token dropped ({len(decoder)} tensors)")
        src = {k: v for k, v in src.items() if k not in decoder}
    if not decoder and any(DECODER_RE.match(k) for k in target):
        fit.notes.append("decoder initialised (not in the source)")
        fit.fresh += [k for k in target if DECODER_RE.match(k)]
    src, head_note = _fit_pre_logits(target, src, fit)
    head_note = head_note or _head_note(target, src)
    if head_note:
        fit.notes.append(head_note)
        fit.fresh += [k for k in target if HEAD_RE.match(k)]
        src = {k: v for k, v in src.items() if not HEAD_RE.match(k)}
    fit.fresh += [k for k in target if HEAD_NORM_RE.match(k) and k not in src]  # BatchNorm statistics
    _fit_norms(target, src, fit)
    bad_shape, kept = [], []
    for key, value in src.items():
        if key not in target or key in fit.fresh:
            continue
        if tuple(value.shape) != target[key]:
            if key in _fixed_tables(enc):  # the target's own sin-cos table is exact at its grid; resampling is not
                fit.fresh.append(key)
                kept.append(key)
                continue
            value = _fit_pos_embed(value, target[key], src, enc, fit) if key == "pos_embed" else None
            if value is None:
                bad_shape.append(f"{key} {tuple(src[key].shape)} vs {target[key]}")
                continue
        fit.state_dict[key] = value
    if kept:
        grid = "x".join(map(str, enc.patch_embed.grid_size))
        fit.notes.append(f"{' and '.join(sorted(kept, key=len))}: the model's own sin-cos table"
                         f"{'s' if len(kept) > 1 else ''} for {grid} (fixed, not resampled)")
    missing = sorted(k for k in target if k not in fit.state_dict and k not in fit.fresh and k not in src)
    unexpected = sorted(k for k in src if k not in target)
    refuse(what, missing, unexpected, bad_shape, _causes(src, target))
    return fit


def _causes(src: dict[str, torch.Tensor], target: dict[str, tuple[int, ...]]) -> list[str]:
    """What differs at the root (width, [CLS], registers), named before the keys it makes differ."""
    causes = []
    w_src, w_tgt = src.get("patch_embed.proj.weight"), target.get("patch_embed.proj.weight")
    if w_src is not None and w_tgt is not None and w_src.shape[0] != w_tgt[0]:
        causes.append(f"the source is {w_src.shape[0]} wide, the model {w_tgt[0]} (model.embed_dim)")
    if ("cls_token" in src) != ("cls_token" in target):
        causes.append("the source has a class token and the model none (model.class_token=true)" if "cls_token" in src
                      else "the model has a class token and the source none (model.class_token=false)")
    regs = [src["reg_token"].shape[1] if "reg_token" in src else 0, target["reg_token"][1] if "reg_token" in target
            else 0]
    if regs[0] != regs[1]:
        causes.append(f"the source has {regs[0]} register tokens, the model {regs[1]} (model.reg_tokens={regs[0]})")
    return causes


def with_prefix_rows(table: torch.Tensor, prefix: int) -> torch.Tensor:
    """A (1, rows, D) table in timm's ``no_embed_class`` layout (a square grid of patch rows, none for the ``prefix``
    tokens) with zero rows put first for them, as vitscale's table has; any other table as it is."""
    rows = table.shape[1] if table.ndim == 3 else 0
    if prefix and rows > prefix and math.isqrt(rows - prefix) ** 2 != rows - prefix and math.isqrt(rows) ** 2 == rows:
        return torch.cat([table.new_zeros(1, prefix, table.shape[-1]), table], dim=1)
    return table


def _fit_pos_embed(table: torch.Tensor, shape: tuple[int, ...], src: dict[str, torch.Tensor], enc: nn.Module,
                   fit: Fit) -> Optional[torch.Tensor]:
    """The source's position table made the target's: timm's ``no_embed_class`` layout (patch rows only) gets zero
    rows for the prefix tokens, which then have no position, exactly as there; another grid is resampled. None when
    the width or the prefix tokens differ: resampling cannot fix those, and the tokens' own keys say why."""
    prefix = (1 if "cls_token" in src else 0) + (src["reg_token"].shape[1] if "reg_token" in src else 0)
    if table.ndim != 3 or table.shape[-1] != shape[-1] or prefix != enc.num_prefix_tokens:
        return None
    padded = with_prefix_rows(table, prefix)
    if padded is not table:
        table = padded
        fit.notes.append(f"pos_embed: zero rows added for {prefix} prefix token{'s' if prefix > 1 else ''} (timm's "
                         f"no_embed_class layout)")
    if tuple(table.shape) != shape:
        table, note = resample_pos_embed(table, shape, prefix, tuple(enc.patch_embed.grid_size))
        fit.notes.append(note)
    return table


def _fixed_tables(enc: nn.Module) -> set[str]:
    """Canonical keys of fixed (not trained) sin-cos position tables: an MAE's decoder table, and the encoder's when
    it is built as sin-cos."""
    return {"decoder_pos_embed"} | ({"pos_embed"} if getattr(enc, "pos_embed_type", None) == "sincos" else set())


def _fit_norms(target: dict, src: dict, fit: Fit) -> None:
    """MAE fine-tuning with average pooling has no final ``norm`` but a fresh ``fc_norm``; the reverse too."""
    for have, want in (("norm", "fc_norm"), ("fc_norm", "norm")):
        if f"{have}.weight" in src and f"{have}.weight" not in target and f"{want}.weight" in target \
                and f"{want}.weight" not in src:
            for part in ("weight", "bias"):
                src.pop(f"{have}.{part}", None)
                fit.fresh.append(f"{want}.{part}")
            fit.notes.append(f"{have} dropped, {want} initialised (pooling differs from the source's)")


def refuse(what: str, missing: list, unexpected: list, bad_shape: list, causes: Optional[list] = None) -> None:
    """One line ``WHAT do not fit the model: CAUSES; missing ...; unexpected ...; shape mismatch ...`` if any key
    list is non-empty (``causes`` say why, first)."""
    def named(keys: list) -> str:
        more = f" (+{len(keys) - MAX_NAMED} more)" if len(keys) > MAX_NAMED else ""
        return ", ".join(keys[:MAX_NAMED]) + more

    problems = list(causes or []) if missing or unexpected or bad_shape else []
    if missing:
        problems.append(f"missing {named(missing)}")
    if unexpected:
        problems.append(f"unexpected {named(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatch {named(bad_shape)}")
    if problems:
        raise WeightsError(f"{what} do not fit the model: {'; '.join(problems)}")
