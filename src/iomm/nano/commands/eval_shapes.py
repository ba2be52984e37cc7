"""`iomm eval shapes`: the exact GenEval-style score of images of the nano world's prompts."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from iomm.evaluation.prompt_images import write_jsonl
from iomm.nano.prompts import eval_prompts
from iomm.nano.scorer import judge_directory, read_prompts, score
from iomm.nano.world import COMPOSITIONS
from iomm.training.hardware import machine_facts


def register_under(commands: argparse._SubParsersAction) -> None:
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
    shapes.add_argument("--steps", type=int, default=None, help="Euler steps with --model (default: config)")
    shapes.add_argument("--cfg", type=float, default=None, help="guidance scale with --model (default: config)")
    shapes.add_argument("--out", type=Path, required=True, help="metrics JSON file")
    shapes.add_argument("--results", type=Path, default=None, help="also write per-image results (JSONL)")
    shapes.set_defaults(func=run_shapes)


def _generate(args: argparse.Namespace) -> Path:
    from iomm.evaluation.prompt_images import generate_for_prompts

    prompts = read_prompts(args.prompts) if args.prompts else eval_prompts(args.per_category, args.seed)
    images_dir = args.images or args.out.parent / f"{args.out.stem}_images"
    generate_for_prompts(args.model, prompts, images_dir, n_samples=args.samples, seed=args.seed,
                         guidance_scale=args.cfg, steps=args.steps)
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
    rows += [f"{key:<30}{metrics[key]:>8.3f}" for key in metrics if key.startswith(f"{COMPOSITIONS}_")]
    return "\n".join(rows)


def _command(args: argparse.Namespace) -> str:
    """The `iomm eval shapes` command that wrote a metrics file (what the docs quote it with)."""
    generation = [("--prompts", args.prompts), ("--per-category", args.per_category), ("--samples", args.samples),
                  ("--seed", args.seed), ("--steps", args.steps), ("--cfg", args.cfg)] if args.model else []
    options = [("--model", args.model), ("--images", args.images), *generation, ("--out", args.out),
               ("--results", args.results)]
    return shlex.join(["iomm", "eval", "shapes", *[f"{k}={v}" for k, v in options if v is not None]])


def run_shapes(args: argparse.Namespace) -> int:
    if args.model is None and args.images is None:
        raise SystemExit("eval shapes: give --images DIR (images to score) or --model RUN_DIR_OR_CKPT")
    images_dir = _generate(args) if args.model is not None else args.images
    records = judge_directory(images_dir)
    metrics = {"command": _command(args), "machine": machine_facts(),
               **score((r["metadata"], r["correct"]) for r in records)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.results is not None:
        write_jsonl(args.results, records)
    print(format_table(metrics))
    print(f"wrote {args.out}")
    return 0
