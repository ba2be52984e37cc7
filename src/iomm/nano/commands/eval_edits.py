"""`iomm eval edits`: zero-shot editing on the nano world, per case (target, kept, exact success) and as rates."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from iomm.nano.edits import CASES_PER_KIND, EDIT_KINDS


def register_under(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("edits", help="zero-shot editing (colour, add, remove) judged by the shapes scorer")
    p.add_argument("--model", required=True, metavar="RUN_DIR_OR_CKPT")
    p.add_argument("--per-kind", type=int, default=CASES_PER_KIND,
                   help=f"edit cases of each kind ({', '.join(EDIT_KINDS)}); default: {CASES_PER_KIND}, "
                        f"{CASES_PER_KIND * len(EDIT_KINDS)} in all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True,
                   help="metrics JSON file (edited images and the per-case edits.jsonl go beside it)")
    p.set_defaults(func=_edits)


def _edits(args: argparse.Namespace) -> int:
    from iomm.inference.pipeline import IOMMPipeline
    from iomm.nano.edits import evaluate_edits

    if args.per_kind < 1:
        raise SystemExit(f"iomm eval edits: --per-kind: expected >= 1, got {args.per_kind}")
    pipeline = IOMMPipeline.from_pretrained(args.model)
    metrics = evaluate_edits(pipeline, args.out.parent / f"{args.out.stem}_edits", args.per_kind, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print("  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    print(f"wrote {args.out}")
    return 0
