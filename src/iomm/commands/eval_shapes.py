"""`iomm eval shapes`: the exact GenEval-style score on the nano world."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from iomm.data.world import eval_prompts
from iomm.commands.eval_edits import register_under as register_edits
from iomm.evaluation.shapes import judge_directory, read_prompts, score


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate generated images")
    commands = evaluate.add_subparsers(dest="eval_command", required=True)
    shapes = commands.add_parser(
        "shapes", help="score images of the nano world's GenEval-style prompts (classical detector)")
    shapes.add_argument("--images", type=Path, default=None,
                        help="folder with metadata.jsonl (+ \"images\" lists) or in GenEval's layout; "
                             "with --model, where the generated images are written")
    shapes.add_argument("--model", default=None, metavar="RUN_DIR_OR_CKPT",
                        help="generate the images for the prompts with this model first")
    shapes.add_argument("--prompts", type=Path, default=None,
                        help="prompt JSONL for --model (default: the built-in eval prompts)")
    shapes.add_argument("--per-category", type=int, default=32)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--samples", type=int, default=4, help="images per prompt with --model")
    shapes.add_argument("--out", type=Path, required=True, help="metrics JSON file")
    shapes.add_argument("--results", type=Path, default=None, help="also write per-image results (JSONL)")
    shapes.set_defaults(func=run_shapes)
    register_edits(commands)


def _generate(args: argparse.Namespace) -> Path:
    try:
        from iomm.inference.evaluate import generate_for_prompts
    except ImportError as error:
        raise SystemExit(f"--model needs iomm.inference.evaluate.generate_for_prompts, "
                         f"which could not be imported: {error}") from None
    prompts = read_prompts(args.prompts) if args.prompts else eval_prompts(args.per_category, args.seed)
    images_dir = args.images or args.out.parent / f"{args.out.stem}_images"
    generate_for_prompts(args.model, prompts, images_dir, n_samples=args.samples, seed=args.seed)
    return images_dir


def format_table(metrics: dict[str, Any]) -> str:
    rows = [f"{'category':<16}{'n':>6}{'passed':>8}{'score':>8}"]
    for tag, counts in metrics["counts"].items():
        rows.append(f"{tag:<16}{counts['n']:>6}{counts['passed']:>8}{metrics[tag]:>8.3f}")
    rows.append(f"{'overall':<16}{'':>14}{metrics['overall']:>8.3f}")
    for key in ("colors_held_out", "colors_seen"):
        tally = metrics[key]
        if tally["n"]:
            rows.append(f"{key:<16}{tally['n']:>6}{tally['passed']:>8}{tally['accuracy']:>8.3f}")
    return "\n".join(rows)


def run_shapes(args: argparse.Namespace) -> int:
    if args.model is None and args.images is None:
        raise SystemExit("eval shapes: give --images DIR (images to score) or --model RUN_DIR_OR_CKPT")
    images_dir = _generate(args) if args.model is not None else args.images
    records = judge_directory(images_dir)
    metrics = score((r["metadata"], r["correct"]) for r in records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.results is not None:
        args.results.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(format_table(metrics))
    print(f"wrote {args.out}")
    return 0
