"""Model names -> models.

Grammar (any patch size P):
    vit_{size}_patch{P}                e.g. vit_large_patch16, vit_huge_patch14, vit_tiny_patch4
    {S}/{P} or ViT-{S}/{P}             short forms, e.g. "L/16", "Ti/16", "H/14", "g/14", "G/14"
    vit_hybrid_r50_{size}_patch16      BiT ResNet-50 stem (stages 3,4,9; stride 16) + 1x1 projection
    mae_<any of the above>             MaskedAutoencoderViT with that encoder
Keyword arguments override the variant; a value of None means "keep the variant's default".
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from vitscale.models.mae import MaskedAutoencoderViT
from vitscale.models.vit import VisionTransformer

# width / depth / heads (/ mlp ratio): the ViT family (Dosovitskiy et al.; Zhai et al. for g, G, e).
VARIANTS: dict[str, dict[str, Any]] = {
    "micro": dict(embed_dim=128, depth=4, num_heads=4),  # CPU demo size
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
    "giant": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),  # mlp 6144
    "gigantic": dict(embed_dim=1664, depth=48, num_heads=16, mlp_ratio=64 / 13),  # mlp 8192
    "e": dict(embed_dim=1792, depth=56, num_heads=16, mlp_ratio=60 / 7),  # mlp 15360
}
SHORT_NAMES = {"Mi": "micro", "Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge",
               "g": "giant", "G": "gigantic", "e": "e"}
# BiT ResNet stems for hybrids: stage depths (3 stages -> stride 16).
HYBRID_STEMS = {"r50": (3, 4, 9)}
# MAE decoder defaults (the paper's 8 x 512, 16 heads); the CPU demo size gets a matching small one.
MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
MAE_DECODER_OVERRIDES = {"micro": dict(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)}
MAE_KWARGS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "decoder_mlp_ratio", "norm_pix_loss",
              "mask_ratio")



@dataclass(frozen=True)
class Family:
    """What a name prefix builds: ``cls`` with ``defaults(size)`` on top of the encoder's sizes; ``options`` are the
    keywords only this family takes."""
    cls: type
    defaults: Callable[[str], dict[str, Any]]
    options: tuple[str, ...] = ()


# Model families by name prefix, most specific first ("" = a plain ViT). A new family is one entry here.
FAMILIES = {
    "mae_": Family(MaskedAutoencoderViT, lambda size: {**MAE_DECODER, **MAE_DECODER_OVERRIDES.get(size, {})},
                   MAE_KWARGS),
    "": Family(VisionTransformer, lambda size: {}),
}

# Canonical (size, patch) pairs listed by list_models(); any other patch size resolves too.
_LISTED = {"micro": (4, 16), "tiny": (4, 16), "small": (16, 32), "base": (8, 16, 32), "large": (14, 16, 32),
           "huge": (14, 16), "giant": (14,), "gigantic": (14,), "e": (14,)}
_LONG_RE = re.compile(r"^vit_(?:hybrid_(r\d+)_)?([a-z]+)_patch(\d+)$")
_SHORT_RE = re.compile(r"^(?:ViT-)?([A-Za-z]+)/(\d+)$")


def list_models(pattern: Optional[str] = None) -> list[str]:
    """Canonical model names (optionally filtered by a glob ``pattern``); other patch sizes also resolve."""
    names = [f"vit_{size}_patch{p}" for size, ps in _LISTED.items() for p in ps]
    names += [f"vit_hybrid_{stem}_{size}_patch16" for stem in HYBRID_STEMS for size in ("small", "base", "large")]
    names = [prefix + n for prefix in sorted(FAMILIES, key=len) for n in names]  # plain ViTs first
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def _suggest(name: str) -> str:
    candidates = list_models() + [f"{s}/{p}" for s in SHORT_NAMES for p in (14, 16)]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown model name {name!r}{hint} (see vitscale.models.list_models())"


def parse_name(name: str) -> tuple[str, str, dict[str, Any]]:
    """``name`` -> (family prefix, size, encoder kwargs from the name). Raises ValueError naming close matches."""
    prefix = next(p for p in FAMILIES if name.startswith(p))  # "" matches every name: it comes last
    rest = name[len(prefix):]
    stem = None
    m = _LONG_RE.match(rest)
    if m:
        stem, size, patch = m.group(1), m.group(2), int(m.group(3))
    else:
        m = _SHORT_RE.match(rest)
        if not m or m.group(1) not in SHORT_NAMES:
            raise ValueError(_suggest(name))
        size, patch = SHORT_NAMES[m.group(1)], int(m.group(2))
    if size not in VARIANTS or patch < 1 or (stem is not None and stem not in HYBRID_STEMS):
        raise ValueError(_suggest(name))
    kwargs: dict[str, Any] = dict(VARIANTS[size], patch_size=patch)
    if stem is not None:
        kwargs["hybrid_layers"] = HYBRID_STEMS[stem]
    return prefix, size, kwargs


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. kwargs override the variant (None = keep the default).

    The name's family (:data:`FAMILIES`) decides the class: plain names give a ``VisionTransformer``, ``mae_``
    names a ``MaskedAutoencoderViT`` whose own options (decoder sizes, norm_pix_loss, mask_ratio) go to it and
    the rest to its encoder. A family's options given to another family's name are a ValueError naming both.
    """
    prefix, size, args = parse_name(name)
    family = FAMILIES[prefix]
    overrides = {k: v for k, v in kwargs.items() if v is not None}
    foreign = sorted({o for f in FAMILIES.values() for o in f.options} & set(overrides) - set(family.options))
    if foreign:
        takers = [p + name[len(prefix):] for p, f in FAMILIES.items() if set(foreign) <= set(f.options)]
        raise ValueError(f"{name!r} does not take {foreign}; use {' or '.join(map(repr, takers))}")
    return family.cls(**{**args, **family.defaults(size), **overrides})


def count_params(name: str, trainable_only: bool = False, **kwargs: Any) -> int:
    """Parameter count of a registered model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
