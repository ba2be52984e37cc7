"""`iomm world sample` and `iomm world prompts`: look at the nano testbed world and its eval prompts."""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from iomm.evaluation.prompt_images import save_prompt_images, write_jsonl
from iomm.image_tensors import captioned_grid
from iomm.nano.prompts import eval_prompts
from iomm.nano.world import BACKGROUNDS, World, WorldConfig, held_out_kinds, scene_to_dict


def register(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser("world", help="the nano testbed world: sample images, write eval prompts")
    commands = world.add_subparsers(dest="world_command", required=True)

    sample = commands.add_parser("sample", help="write PNGs + metadata.jsonl (caption and scene per image)")
    sample.add_argument("--n", type=int, required=True, help="number of images")
    sample.add_argument("--out", type=Path, required=True, help="output folder")
    sample.add_argument("--seed", type=int, default=0)
    _add_world_options(sample)
    sample.add_argument("--pairs", action="store_true",
                        help="sample the training pair set (held-out combinations rejected, some captions "
                             "without colours) instead of the unlabeled stream")
    sample.add_argument("--grid", nargs="?", type=Path, const=True, default=None, metavar="PNG",
                        help="also write a captioned grid of the first 16 images (default <out>/grid.png)")
    sample.set_defaults(func=run_sample)

    prompts = commands.add_parser("prompts", help="write GenEval-style eval prompt metadata (JSONL)")
    prompts.add_argument("--out", type=Path, required=True, help="output JSONL file")
    prompts.add_argument("--per-category", type=int, default=32)
    prompts.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--render", type=Path, default=None, metavar="DIR",
                         help="also render each prompt into DIR (the layout `iomm eval shapes --images` reads)")
    prompts.add_argument("--samples", type=int, default=4, help="renders per prompt with --render")
    _add_world_options(prompts)
    prompts.set_defaults(func=run_prompts)


def _add_world_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--background", choices=[*BACKGROUNDS, "mixed"], default="white")
    parser.add_argument("--max-objects", type=int, default=4)


def _world(args: argparse.Namespace) -> World:
    return World(WorldConfig(resolution=args.resolution, max_objects=args.max_objects, background=args.background))


def run_sample(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise SystemExit(f"--n: expected >= 1, got {args.n}")
    world = _world(args)
    if args.pairs:
        samples = world.pairs(args.n, args.seed)
    else:
        samples = [(image, world.caption(scene), scene)
                   for image, scene in itertools.islice(world.images(args.seed), args.n)]
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, caption, scene) in enumerate(samples):
        name = f"{i:06d}.png"
        Image.fromarray(image).save(args.out / name)
        counts = dict(Counter(o.shape for o in scene.objects))  # per class, like GenEval's include counts
        lines.append(json.dumps({"image": name, "caption": caption, "held_out": sorted(held_out_kinds(scene)),
                                 "counts": counts, **scene_to_dict(scene)}))
    (args.out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(samples)} images and metadata.jsonl to {args.out}")
    if args.grid is not None:
        path = args.out / "grid.png" if args.grid is True else args.grid
        path.parent.mkdir(parents=True, exist_ok=True)
        shown = samples[:16]
        captioned_grid([s[0] for s in shown], [s[1] for s in shown]).save(path)
        print(f"wrote {path}")
    return 0


def run_prompts(args: argparse.Namespace) -> int:
    prompts = eval_prompts(args.per_category, args.seed, args.resolution)
    write_jsonl(args.out, prompts)
    print(f"wrote {len(prompts)} prompts to {args.out}")
    if args.render is not None:
        world, rng = _world(args), np.random.default_rng([args.seed, 3])
        renders = [[world.render(world.scene_from_prompt(meta, rng)) for _ in range(args.samples)] for meta in prompts]
        print(f"wrote renders to {save_prompt_images(args.render, prompts, renders).parent}")
    return 0
