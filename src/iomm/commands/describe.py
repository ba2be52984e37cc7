"""`iomm describe`: parameter counts per component without allocating weights."""

from __future__ import annotations

import argparse
import json

from iomm.commands.train import add_config_args
from iomm.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("describe", help="parameter counts per component (meta device, no weights)")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_describe)


def _describe(args: argparse.Namespace) -> int:
    from iomm.describe import describe, format_counts

    counts = describe(load_config(args.config, args.overrides, check_paths=False))
    print(json.dumps(counts, indent=1) if args.json else format_counts(counts))
    return 0
