"""`iomm pretrain` (stage 1: image-only) and `iomm finetune` (stage 2: mixed)."""

from __future__ import annotations

import argparse

from iomm.config import config_source
from iomm.config_checks import finetune_config, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=100 (repeatable)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pretrain", help="stage 1: image-only pre-training by masked self-conditioning")
    add_config_args(p)
    p.add_argument("--out", required=True, help="run directory (resumes from its newest checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_pretrain)

    p = subparsers.add_parser("finetune", help="stage 2: fine-tune on a mix of unlabeled images and pairs")
    add_config_args(p)
    p.add_argument("--init", required=True, help="checkpoint or run dir to start from, or 'none' (from scratch)")
    p.add_argument("--out", required=True, help="run directory (resumes from its newest checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_finetune)


def _pretrain(args: argparse.Namespace) -> int:
    from iomm.evaluation.sample_grid import sample_grid
    from iomm.training.trainer import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, args.out, progress=not args.no_progress, sample_fn=sample_grid)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from iomm.evaluation.sample_grid import sample_grid
    from iomm.training.trainer import train

    cfg = finetune_config(load_config(args.config, args.overrides), config_source(args.config, args.overrides))
    train(cfg, args.out, init=None if args.init == "none" else args.init, progress=not args.no_progress,
          sample_fn=sample_grid)
    return 0
