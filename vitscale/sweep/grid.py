"""The grid: ``KEY=V1,V2`` axes times seeds -> cells, each a named list of ``key=value`` overrides."""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from vitscale.errors import VitscaleError


class SweepError(VitscaleError, ValueError):
    """A sweep cannot start (bad grid, no cell valid); the message is one line."""


@dataclass(frozen=True)
class Cell:
    """One training of the grid: its axis values, its seed and the overrides that make it."""

    params: tuple[tuple[str, str], ...]  # ((key, value), ...) in axis order
    seed: int
    fixed: tuple[str, ...] = field(default=())  # overrides shared by every cell

    @property
    def group(self) -> str:
        """The cell's place in the table: its axis values without the seed."""
        return ", ".join(f"{k}={v}" for k, v in self.params) or "(base)"

    @property
    def name(self) -> str:
        """A file-system-safe, readable name: the run's `run.name` and its folder. The seed suffix is always kept;
        axis values too long to show whole are cut and followed by a hash of all of them, so two cells that differ
        only past the cut (long init paths, shard specs) still get folders of their own."""
        body = re.sub(r"[^A-Za-z0-9._=-]+", "_", "__".join(f"{_short(k)}-{v}" for k, v in self.params))
        seed = f"s{self.seed}"
        if len(body) + len(seed) + 2 > MAX_NAME:
            digest = hashlib.sha256(json.dumps(self.params).encode()).hexdigest()[:HASH_CHARS]
            body = f"{body[:MAX_NAME - len(seed) - HASH_CHARS - 3]}-{digest}"
        return f"{body}__{seed}" if body else seed

    def overrides(self) -> list[str]:
        return [*self.fixed, *(f"{k}={v}" for k, v in self.params), f"run.seed={self.seed}"]


MAX_NAME = 150  # well under the 255 bytes a file name may have, with room for what train adds
HASH_CHARS = 10  # of the params' sha256: a collision among a grid's cells is out of reach


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def parse_axes(items: Sequence[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Split ``KEY=V1,V2`` arguments into grid axes and ``KEY=V`` overrides every cell shares.

    A value list is split on commas that are not inside braces or brackets, so shard patterns such as
    ``data.train_shards=x-{0000..0009}.tar`` stay one value.
    """
    axes: list[tuple[str, list[str]]] = []
    fixed: list[str] = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SweepError(f"expected KEY=V1,V2,... but got {item!r}")
        if key == "run.seed":
            raise SweepError("run.seed is set by --seeds (seeds run.seed, run.seed+1, ...): do not put it in the grid")
        if key in (a[0] for a in axes) or any(f.partition("=")[0] == key for f in fixed):
            raise SweepError(f"key {key!r} given twice")
        values = _split_values(text)
        if len(values) > 1:
            if len(set(values)) != len(values):
                raise SweepError(f"{key}: repeated value in {text!r}")
            axes.append((key, values))
        else:
            fixed.append(f"{key}={text}")
    # Two axes whose last names collide would give identical cell names: keep names unique.
    shorts = [_short(k) for k, _ in axes]
    if len(set(shorts)) != len(shorts):
        raise SweepError(f"axes {[k for k, _ in axes]} share a last key name; sweep them in separate grids")
    return axes, fixed


def _split_values(text: str) -> list[str]:
    """Axis values: split at commas outside brackets and quotes ('model.freeze="patch_embed,blocks.0"' is one
    value, which YAML then reads without its quotes)."""
    values, depth, current, quote = [], 0, "", ""
    for ch in text:
        if ch in "\"'" and (not quote or ch == quote):
            quote = "" if quote else ch
        if not quote:
            depth += ch in "{[("
            depth -= ch in "}])"
        if ch == "," and depth == 0 and not quote:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    if any(v == "" for v in values) and len(values) > 1:
        raise SweepError(f"empty value in {text!r}")
    return values


def expand_grid(axes: Sequence[tuple[str, list[str]]], fixed: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    """Every combination of axis values, for every seed; seed varies fastest so groups stay together."""
    keys = [k for k, _ in axes]
    combos = itertools.product(*(values for _, values in axes)) if axes else [()]
    cells = [Cell(tuple(zip(keys, combo)), seed, tuple(fixed)) for combo in combos for seed in seeds]
    check_unique_names(cells)
    return cells


def check_unique_names(cells: Sequence[Cell]) -> None:
    """Two cells with one name would train into one folder and report each other's results: refuse the grid.
    (Values that differ only in characters a folder name cannot hold, e.g. ``a/b`` and ``a:b``, share a name.)"""
    seen: dict[str, Cell] = {}
    for cell in cells:
        other = seen.setdefault(cell.name, cell)
        if other is not cell:
            raise SweepError(f"cells ({other.group}) and ({cell.group}) would share the folder {cell.name!r}: "
                             "their values differ only in characters a folder name cannot hold; rename one")
