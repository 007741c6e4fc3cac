"""YAML as a config file needs it read: a key given twice in one mapping is an error, not a silent "last one wins"
(a second ``train:`` section further down a file replaced the first one whole)."""
from __future__ import annotations

import re
from typing import Any

import yaml

from vitscale.errors import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"  # "<<: *anchor": keys given beside it override the merged ones, by design


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key, line = loader.construct_object(key_node, deep=True), key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the safe loader's own error names it
            continue
        if first is not None:
            raise ConfigError(f"key {key!r} is given twice in one mapping (lines {first} and {line}): the second "
                              f"would silently replace the first")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_unique(text: str) -> Any:
    """``yaml.safe_load`` that raises :class:`ConfigError` for a key given twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


# YAML 1.1 (PyYAML) reads 5e8 as a string: a float needs a dot (5.0e+8). Keys vitscale knows are converted by their
# type; DeepSpeed's own keys (engine.ds_config) have none here, so numbers written so are made numbers.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def exponent_numbers(value: Any) -> Any:
    """VALUE with every string such as "5e8" (in nested dicts and lists) as a number: an int when it is whole."""
    if isinstance(value, dict):
        return {k: exponent_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exponent_numbers(v) for v in value]
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and abs(number) < 2**63 else number
    return value
