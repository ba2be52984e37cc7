"""`iomm generate` (text-to-image), `iomm edit` (zero-shot editing) and `iomm reconstruct` (an image regenerated
from its own masked stage-1 condition, as the demo's reconstruction tab shows it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


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

    p = subparsers.add_parser("reconstruct", help="regenerate your own image from its masked stage-1 condition: "
                                                  "the masked view and the regeneration side by side")
    p.add_argument("--model", required=True, help="checkpoint dir, run dir (newest checkpoint) or an export")
    p.add_argument("--image", required=True)
    p.add_argument("--mask-ratio", type=float, default=None, metavar="R",
                   help="share of patch tokens masked, in [0, 1) (default: the run's masking.ratio)")
    p.add_argument("--seed", type=int, default=0, help="the mask and the sampling noise")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: config)")
    p.add_argument("--no-ema", action="store_true", help="sample from the raw instead of the EMA weights")
    p.add_argument("--out", default=None, help="output PNG file (default: IMAGE_STEM.reconstruction.png here)")
    p.set_defaults(func=_reconstruct)


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


def _read_image_or_say_why(path: str) -> Image.Image | None:
    """Read before loading the model: a bad --image should not cost a model load."""
    from iomm.data.images import BadSample, read_image

    try:
        return read_image(path)
    except BadSample as err:
        print(f"iomm: {path}: not a readable image ({err})", file=sys.stderr)
        return None


def _edit(args: argparse.Namespace) -> int:
    from iomm.inference.pipeline import IOMMPipeline, generate_images

    reference = _read_image_or_say_why(args.image)
    if reference is None:
        return 2
    pipe = IOMMPipeline.from_pretrained(args.model, use_ema=not args.no_ema)
    edited = generate_images(pipe, [args.instruction], [reference], seed=args.seed, num_inference_steps=args.steps,
                             guidance_scale=args.cfg)[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    edited.save(args.out)
    print(f"wrote {args.out}")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    import torch

    from iomm.image_tensors import image_grid, to_tensor
    from iomm.inference.pipeline import IOMMPipeline

    if args.mask_ratio is not None and not 0.0 <= args.mask_ratio < 1.0:
        raise SystemExit(f"--mask-ratio: expected a value in [0, 1), got {args.mask_ratio}")
    original = _read_image_or_say_why(args.image)
    if original is None:
        return 2
    pipe = IOMMPipeline.from_pretrained(args.model, use_ema=not args.no_ema)
    ratio = pipe.cfg.masking.ratio if args.mask_ratio is None else args.mask_ratio
    masked, regenerated = pipe.reconstruct(original, ratio, generator=torch.Generator().manual_seed(args.seed),
                                           num_inference_steps=args.steps)
    out = Path(args.out or f"{Path(args.image).stem}.reconstruction.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid([to_tensor([masked, regenerated])]).save(out)
    print(f"wrote {out}: the image masked at ratio {ratio:g} (left) and regenerated from that (right)")
    return 0
