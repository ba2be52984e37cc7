"""`iomm data shards`: an image folder or a JSONL pair list as WebDataset tar shards; `iomm data cache`: a
config's training images encoded once by its frozen codec and MLLM (`data.latents`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare training data: WebDataset shards")
    commands = data.add_subparsers(dest="data_command", required=True)
    shards = commands.add_parser("shards", help="write a folder of images or a JSONL of pairs as tar shards "
                                                "(resized and centre-cropped; a bad file is skipped and counted)")
    shards.add_argument("--input", type=Path, required=True,
                        help="an image folder (a caption beside an image as NAME.txt is kept) or a JSONL of "
                             '{"image", "caption"} lines')
    shards.add_argument("--out", type=Path, required=True, help="output folder for 000000.tar, 000001.tar, ...")
    shards.add_argument("--resolution", type=int, default=256, help="side of the square images written")
    shards.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    shards.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image encoding (jpg: quality 95)")
    shards.add_argument("--no-progress", action="store_true")
    shards.set_defaults(func=run_shards)

    cache = commands.add_parser("cache", help="encode every training image of a config once (VAE posterior + "
                                              "MLLM image tokens); then train with --set data.latents=OUT")
    cache.add_argument("--config", help="YAML config (default: built-in defaults)")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cache.add_argument("--out", type=Path, required=True, help="cache directory (images/, pairs/, cache.json)")
    cache.add_argument("--batch-size", type=int, default=64)
    cache.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    cache.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="storage type (float32: the online loss exactly; bfloat16 halves the size)")
    cache.add_argument("--no-progress", action="store_true")
    cache.set_defaults(func=run_cache)


def _samples(source: Path, report) -> list[tuple[Path, str | None]]:
    from iomm.data.images import list_images
    from iomm.data.pairs import read_pairs

    if source.is_dir():
        files = list_images(source)
        captions = [f.with_suffix(".txt") for f in files]
        return [(f, c.read_text(encoding="utf-8").strip() if c.is_file() else None) for f, c in zip(files, captions)]
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such image folder or JSONL file")
    return [(pair.image, pair.caption) for pair in read_pairs(source, report)]


def caption_lines(captioned: int, samples: int) -> list[str]:
    """How many samples have a caption and, when some lack one (shards meant for pairs), what that costs."""
    from iomm.config import DataConfig

    if captioned == samples:
        return [f"captions: all {samples} samples"]
    if captioned == 0:
        return [f"captions: none of {samples} samples (for data.path as images, not for data.pairs)"]
    missing, limit = samples - captioned, DataConfig().max_bad_fraction
    return [f"captions: {captioned} of {samples} samples",
            f"warning: as data.pairs, the {missing} without a caption ({missing / samples:.0%}) are skipped as "
            f"'empty or missing caption', above data.max_bad_fraction ({limit:.0%}), which stops a run; put "
            "NAME.txt beside each image, or use these shards as data.path (images) only"]


def run_shards(args: argparse.Namespace) -> int:
    from iomm.data.images import DataReport
    from iomm.data.shards import write_shards

    if args.resolution < 8 or args.per_shard < 1:
        raise SystemExit(f"iomm data shards: expected --resolution >= 8 and --per-shard >= 1, got "
                         f"{args.resolution} and {args.per_shard}")
    lines = DataReport()  # JSONL lines: a bad one is a sample skipped; a good one is counted when its image is read
    samples = _samples(args.input, lines)
    images = DataReport()
    root = args.input if args.input.is_dir() else args.input.parent  # the json member's source names start here
    written = write_shards(samples, args.out, args.resolution, args.per_shard, args.format, images,
                           progress=not args.no_progress, root=root)
    report = DataReport.merged([{**lines.to_dict(), "seen": sum(lines.skipped.values())}, images.to_dict()])
    command = (f"iomm data shards --input {args.input} --out {args.out} --resolution {args.resolution} "
               f"--per-shard {args.per_shard} --format {args.format}")
    summary = {"command": command, "shards": len(written.shards), "samples": written.samples,
               "captioned": written.captioned, "data": report.to_dict()}
    (args.out / "shards.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"{written.samples} samples in {len(written.shards)} shards -> {args.out}")
    print("\n".join(caption_lines(written.captioned, written.samples)))
    print(report.summary())
    return 0


def run_cache(args: argparse.Namespace) -> int:
    import torch

    from iomm.config_checks import load_config
    from iomm.data.images import DataReport
    from iomm.data.latent_cache import write_latent_cache
    from iomm.model import build_codec, load_mllm

    cfg = load_config(args.config, args.overrides)
    if cfg.data.latents is not None:
        raise SystemExit("iomm data cache: the config already reads a cache (data.latents); unset it")
    mllm = load_mllm(cfg)
    codec = build_codec(cfg).to(mllm.device)
    command = " ".join(["iomm data cache", *([f"--config {args.config}"] if args.config else []),
                        *(f"--set {o}" for o in args.overrides), f"--out {args.out}", f"--dtype {args.dtype}"])
    info = write_latent_cache(cfg, args.out, codec, mllm, command=command, batch_size=args.batch_size,
                              dtype=getattr(torch, args.dtype), per_shard=args.per_shard,
                              progress=not args.no_progress)
    cached = ", ".join(f"{n} {name}" for name, n in info["samples"].items())
    print(f"cached {cached} -> {args.out}; train with --set data.latents={args.out}")
    print(DataReport.merged([info["data"]]).summary())
    return 0
