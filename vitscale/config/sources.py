"""``data.train_shards`` as several weighted sources: parsing and checking, before anything is read or written.

Three forms (docs/data.md, "Mixing sources"):

- one shard spec (a string): today's single stream, unchanged;
- a YAML list of ``{shards: SPEC, weight: W, name: NAME}`` (``name`` optional, default: the source's index);
- the compact one-line form for the command line, ``"0.7*SPEC_A + cc=0.3*SPEC_B"``: terms ``[NAME=]WEIGHT*SPEC``
  joined by `` + `` (a plus with spaces around it, which shard paths do not contain).

Weights are relative (``0.7``/``0.3`` and ``7``/``3`` draw alike); a weight of 0 switches a source off. Every
mistake is one ``ConfigError`` line naming the key (``data.train_shards[1].weight``).
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from vitscale.errors import ConfigError

KEY = "data.train_shards"
SOURCE_KEYS = ("shards", "weight", "name")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # names go into metric keys (data/source_<name>_samples)
_TERM = re.compile(r"^\s*(?:(?P<name>[^=*\s]+)\s*=\s*)?(?P<weight>[0-9][0-9.eE+-]*|\.[0-9][0-9eE+-]*)\s*\*\s*"
                   r"(?P<spec>\S.*?)\s*$")
_COMPACT = re.compile(r"^\s*(?:[^=*\s]+\s*=\s*)?[0-9.][0-9.eE+-]*\s*\*")  # starts like a weighted term
_JOIN = re.compile(r"\s\+\s")


@dataclass(frozen=True)
class Source:
    """One weighted source of training shards."""
    name: str
    spec: str
    weight: float


def is_mix(value: Any) -> bool:
    """True when ``data.train_shards`` names several weighted sources (a list, or the compact form)."""
    return isinstance(value, list) or (isinstance(value, str) and bool(_COMPACT.match(value)))


def parse_sources(value: Any) -> Optional[list[Source]]:
    """The sources of ``data.train_shards``, checked; None for a plain single spec (today's stream)."""
    if not is_mix(value):
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{KEY} is empty: give a shard spec (e.g. demo:digits) or a list of sources")
        return None
    raw = value if isinstance(value, list) else _compact(value)
    if not raw:
        raise ConfigError(f"{KEY} is an empty list: give at least one {{shards: SPEC, weight: W}}")
    sources = [_source(entry, i) for i, entry in enumerate(raw)]
    seen: dict = {}
    for i, s in enumerate(sources):
        if s.name in seen:
            raise ConfigError(f"{KEY}[{i}].name {s.name!r} is also the name of {KEY}[{seen[s.name]}]: "
                              f"names must differ")
        seen[s.name] = i
    if not sum(s.weight for s in sources) > 0:
        raise ConfigError(f"{KEY}: the weights add up to 0: at least one source needs a weight > 0")
    return sources


def _compact(text: str) -> list[dict]:
    out = []
    for i, term in enumerate(_JOIN.split(text.strip())):
        m = _TERM.match(term)
        if not m:
            raise ConfigError(f"{KEY}: term {i + 1} {term.strip()[:60]!r} is not [NAME=]WEIGHT*SPEC (terms are "
                              f"joined by ' + ')")
        try:
            weight = float(m["weight"])
        except ValueError:
            raise ConfigError(f"{KEY}[{i}].weight: {m['weight']!r} is not a number") from None
        entry = {"shards": m["spec"], "weight": weight}
        if m["name"] is not None:
            entry["name"] = m["name"]
        out.append(entry)
    return out


def _source(entry: Any, i: int) -> Source:
    where = f"{KEY}[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping {{shards: SPEC, weight: W, name: NAME}}, got "
                          f"{type(entry).__name__}")
    for k in entry:
        if k not in SOURCE_KEYS:
            near = difflib.get_close_matches(str(k), SOURCE_KEYS, n=1, cutoff=0.0)
            raise ConfigError(f"unknown key '{k}' in {where} (did you mean '{near[0]}'?)")
    spec = entry.get("shards")
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{where}.shards is missing or empty: give a shard spec (brace pattern, manifest, "
                          f"demo:...)" if spec is None or isinstance(spec, str) else
                          f"{where}.shards must be one shard spec (a string), got {type(spec).__name__}")
    if is_mix(spec):
        raise ConfigError(f"{where}.shards is itself a mix: list every source at the top level")
    weight = entry.get("weight")
    if weight is None:
        raise ConfigError(f"{where}.weight is missing: give a number >= 0 (weights are relative)")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ConfigError(f"{where}.weight must be a number, got {weight!r}")
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"{where}.weight must be a finite number >= 0, got {weight}")
    name = entry.get("name", str(i))
    if not isinstance(name, (str, int)) or isinstance(name, bool) or not _NAME.fullmatch(str(name)):
        raise ConfigError(f"{where}.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
    return Source(name=str(name), spec=spec.strip(), weight=float(weight))


def describe(value: Any) -> str:
    """``data.train_shards`` as an error message quotes it: the spec, or how many sources a mix has."""
    sources = parse_sources(value)
    if sources is None:
        return f"{KEY}={value!r}"
    return f"{KEY} (a mix of {len(sources)} source(s): {', '.join(s.name for s in sources)})"
