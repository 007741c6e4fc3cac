"""The `vitscale check-shards` subcommand's arguments: argparse only, so that every `vitscale` call (which registers
all subcommands) parses before torch loads; :mod:`vitscale.data.check` does the work."""
from __future__ import annotations

import argparse


def _check_shards(args: argparse.Namespace) -> int:
    from vitscale.data.check import main

    return main(args)


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("check-shards", help="read every shard: samples, labels, bad/duplicate/oversized samples, "
                                            "class-sorted order; exit 1 if something would hurt training")
    c.add_argument("spec", nargs="?", help="shard spec as in data.train_shards (manifest, dir, brace pattern, list, "
                                         "demo:..., or a mix '0.7*A + cc=0.3*B': each source is reported)")
    c.add_argument("--config", default=None, help="check a config's data.train_shards (every source of a mix), "
                                                  "with its data.label_key and data.cache_dir")
    c.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE", help="overrides of --config")
    c.add_argument("--label-key", default=None, help="cls, txt or json:FIELD (as data.label_key; default cls)")
    c.add_argument("--num-classes", type=int, default=0, help="flag labels outside 0..N-1 and missing labels")
    c.add_argument("--max-pixels", type=int, default=None, help="pixel limit (default: data.max_pixels' default)")
    c.add_argument("--decode", action="store_true", help="decode every image (default: read headers only)")
    c.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    c.add_argument("--cache-dir", default=None, help="where demo: shards are built (default data_cache)")
    c.add_argument("--json", default=None, help="also write the report as JSON to this file")
    c.set_defaults(func=_check_shards)
