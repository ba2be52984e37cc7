"""`iomm generate` (text-to-image) and `iomm edit` (zero-shot editing)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint dir or run dir (newest checkpoint)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: config)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="sample from the raw instead of the EMA weights")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="text-to-image: one image per prompt plus a grid")
    _sampling_args(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    group.add_argument("--prompts", help="a text file (one prompt a line) or JSONL with a 'prompt' field")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("edit", help="zero-shot editing: reference image + instruction -> edited image")
    _sampling_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("--instruction", required=True)
    p.add_argument("--out", required=True, help="output PNG file")
    p.set_defaults(func=_edit)


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            record = json.loads(line)
            if not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: expected a 'prompt' string field, got {record!r:.80}")
            line = record["prompt"]
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    import torch

    from iomm.image_tensors import image_grid, to_tensor
    from iomm.inference.pipeline import IOMMPipeline, generate_images

    prompts = args.prompt or read_prompts(args.prompts)
    pipe = IOMMPipeline.from_pretrained(args.model, use_ema=not args.no_ema)
    images = generate_images(pipe, prompts, seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "prompts.jsonl").open("w", encoding="utf-8") as f:
        for i, (prompt, image) in enumerate(zip(prompts, images)):
            image.save(out / f"{i:05d}.png")
            f.write(json.dumps({"file": f"{i:05d}.png", "prompt": prompt, "seed": args.seed}) + "\n")
    tensors = to_tensor(images)
    rows = [tensors[i:i + 8] for i in range(0, len(tensors), 8)]
    if len(rows) > 1 and rows[-1].shape[0] < 8:
        rows[-1] = torch.cat([rows[-1], torch.full((8 - rows[-1].shape[0], *rows[-1].shape[1:]), 0.5)])
    image_grid(rows).save(out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0


def _edit(args: argparse.Namespace) -> int:
    import sys

    from iomm.data.images import BadSample, read_image
    from iomm.inference.pipeline import IOMMPipeline, generate_images

    try:  # before loading the model: a bad --image should not cost a model load
        reference = read_image(args.image)
    except BadSample as err:
        print(f"iomm: {args.image}: not a readable image ({err})", file=sys.stderr)
        return 2
    pipe = IOMMPipeline.from_pretrained(args.model, use_ema=not args.no_ema)
    edited = generate_images(pipe, [args.instruction], [reference], seed=args.seed, num_inference_steps=args.steps,
                             guidance_scale=args.cfg)[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    edited.save(args.out)
    print(f"wrote {args.out}")
    return 0
