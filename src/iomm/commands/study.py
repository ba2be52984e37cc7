"""`iomm study NAME`: the paper's ablations at nano scale, several seeds, CSV + JSON + PNG."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from iomm.commands.recipe import packaged_config
from iomm.nano.studies import studies


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("study", help="run one of the paper's studies at nano scale")
    p.add_argument("name", choices=sorted(studies()))
    p.add_argument("--config", default=None, help="config (default: the packaged configs/nano.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to every arm (e.g. a shorter budget: --set train.steps=500)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--parallel", type=int, default=2, help="arms run at once, one thread each")
    p.add_argument("--per-category", type=int, default=64, help="held-out prompts per GenEval category")
    p.add_argument("--samples", type=int, default=4, help="images per prompt (same noise in every arm)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_study)


def _study(args: argparse.Namespace) -> int:
    from iomm.config import load_config
    from iomm.nano.studies import check_arms, run_study

    config = str(args.config or packaged_config("nano"))
    study = studies()[args.name]
    load_config(config, [*study.common, *args.overrides])  # fail before any compute
    check_arms(study, config, args.overrides)
    command = shlex.join(["iomm", "study", args.name, *(["--config", args.config] if args.config else []),
                          *[f"--set={o}" for o in args.overrides], f"--seeds={args.seeds}",
                          f"--parallel={args.parallel}", f"--per-category={args.per_category}",
                          f"--samples={args.samples}", f"--out={args.out}"])
    out = run_study(study, config, args.seeds, Path(args.out), args.parallel, args.per_category, args.overrides,
                    args.samples, command)
    print(f"wrote {out}/results.json, results.csv, results.png")
    return 0
