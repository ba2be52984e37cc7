"""`iomm eval export`: images in the layout an official scorer reads (GenEval, DPG-Bench, WISE)."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from iomm.evaluation.geneval_export import (
    DEFAULT_SAMPLES,
    GenerateFn,
    load_prompts,
    write_geneval_layout,
    write_one_per_prompt,
)


def register_under(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="generate images in the layout an official scorer reads (GenEval, DPG-Bench, WISE)")
    export.add_argument("benchmark", choices=list(DEFAULT_SAMPLES))
    export.add_argument("--model", required=True, metavar="RUN_DIR_OR_CKPT")
    export.add_argument("--prompts", type=Path, nargs="+", required=True,
                        help="geneval: one evaluation_metadata.jsonl; dpg: the dpg_bench/prompts folder "
                             "(<item_id>.txt files); wise: one or more data/*.json files")
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.add_argument("--samples", type=int, default=None,
                        help="images per prompt (default: geneval 4, dpg 4 as a 2x2 grid, wise 1)")
    export.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    export.add_argument("--steps", type=int, default=None, help="Euler steps (default: config)")
    export.add_argument("--cfg", type=float, default=None, help="guidance scale (default: config)")
    export.set_defaults(func=run_export)


def _pipeline_generate_fn(args: argparse.Namespace) -> GenerateFn:
    """The IOMM pipeline as a `generate_fn`, loaded on first use (so bad prompt files fail first)."""
    from iomm.inference.pipeline import IOMMPipeline, generate_images

    pipes: list[IOMMPipeline] = []

    def generate(prompts: list[str], seed: int) -> list[Image.Image]:
        if not pipes:
            pipes.append(IOMMPipeline.from_pretrained(args.model))
        return generate_images(pipes[0], prompts, seed=seed, num_inference_steps=args.steps, guidance_scale=args.cfg)

    return generate


def run_export(args: argparse.Namespace) -> int:
    samples = DEFAULT_SAMPLES[args.benchmark] if args.samples is None else args.samples
    generate = _pipeline_generate_fn(args)
    if args.benchmark == "geneval":
        if len(args.prompts) != 1:
            raise SystemExit(f"--prompts: geneval takes one evaluation_metadata.jsonl, got {len(args.prompts)} paths")
        folders = write_geneval_layout(args.prompts[0], args.out, generate, samples, args.seed)
        print(f"wrote {len(folders)} prompt folders x {samples} samples to {args.out} (GenEval layout)")
        return 0
    pairs = [pair for source in args.prompts for pair in load_prompts(source, args.benchmark)]
    written = write_one_per_prompt(pairs, args.out, generate, args.benchmark, samples, args.seed)
    print(f"wrote {len(written)} images to {args.out} ({args.benchmark} naming, {samples} sample(s) each)")
    return 0
