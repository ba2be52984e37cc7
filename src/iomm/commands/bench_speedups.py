"""`iomm bench speedups`: each speed-up of the training step alone on top of the naive faithful step, then all
together, each row `iomm bench train-step` in its own process (so its peak memory is its own): time, images/s,
peak memory, FLOPs and MFU of `Trainer.train_step`.

Every row reads the same images, a folder of world images at the config's resolution, and the cached-latent rows
read its latent cache (`iomm data cache`), both made first in `--work`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...] = ()  # on top of NAIVE
    cached_latents: bool = False  # read the VAE moments and vision tokens from the latent cache
    kind: str = "exact"  # exact: the same loss; trade-off: a different computation; memory: memory for time


EXACT = (Row("prefix KV cache", ("mllm.prefix_cache=true",)), Row("cached latents", cached_latents=True),
         Row("bf16 where native", ("train.mixed_precision=auto",)),
         Row("torch.compile of the generator blocks", ("train.compile=true",)),
         Row("fused AdamW", ("train.fused_optimizer=true",)))


def rows() -> list[Row]:
    every = tuple(o for row in EXACT for o in row.overrides)
    return [Row("naive faithful step"), *EXACT, Row("masking.mode=drop", ("masking.mode=drop",), kind="trade-off"),
            Row("all exact speed-ups", every, True),
            Row("all exact speed-ups + masking.mode=drop", (*every, "masking.mode=drop"), True, "trade-off"),
            Row("all exact speed-ups + activation checkpointing", (*every, "train.activation_checkpointing=true"),
                True, "memory")]


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("speedups", help="each training-step speed-up alone and all together, one process each")
    s.add_argument("--config", required=True)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--images", type=int, default=64, help="world images in the folder every row reads")
    s.add_argument("--work", type=Path, default=Path("runs/bench/speedups"), help="images, latent cache, rows")
    s.add_argument("--out", type=Path, default=Path("runs/bench/speedups.json"))
    s.set_defaults(func=run)


def _iomm(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "iomm.cli", *argv], check=True)


def _sets(overrides: list[str] | tuple[str, ...]) -> list[str]:
    return [f"--set={o}" for o in overrides]


def run(args: argparse.Namespace) -> int:
    from iomm.config import load_config
    from iomm.training.bench import NAIVE, machine

    cfg = load_config(args.config, args.overrides, check_paths=False)
    images, latents = args.work / "images", args.work / "latents"
    data = [*args.overrides, "data.source=folder", f"data.path={images}"]
    if not (images / "metadata.jsonl").is_file():
        _iomm("world", "sample", "--n", str(args.images), "--resolution", str(cfg.data.resolution),
              "--out", str(images))
    if not (latents / "cache.json").is_file():
        _iomm("data", "cache", "--config", args.config, *_sets(data), "--out", str(latents), "--no-progress")
    results = []
    for row in rows():
        out = args.work / "rows" / (row.name.replace(" ", "_").replace("/", "_") + ".json")
        sets = [*data, *NAIVE, *row.overrides, *([f"data.latents={latents}"] if row.cached_latents else [])]
        if not out.is_file():
            _iomm("bench", "train-step", "--config", args.config, *_sets(sets), f"--steps={args.steps}",
                  f"--warmup={args.warmup}", f"--out={out}")
        results.append({"row": row.name, "kind": row.kind, "overrides": list(row.overrides),
                        **json.loads(out.read_text(encoding="utf-8"))["run"]})
    naive = results[0]["seconds_per_step"]["step"]
    for result in results:
        result["speedup"] = naive / result["seconds_per_step"]["step"]
    command = ["iomm", "bench", "speedups", "--config", args.config, *_sets(args.overrides), f"--steps={args.steps}",
               f"--warmup={args.warmup}", f"--images={args.images}", f"--work={args.work}", f"--out={args.out}"]
    record = {"command": shlex.join(command), "machine": machine(), "naive": NAIVE, "rows": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(table(record))
    print(f"wrote {args.out}")
    return 0


def table(record: dict) -> str:
    lines = ["| row | kind | ms / step | images / s | speed-up | peak memory (MiB) | MFU step / generator |",
             "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        generator = r["mfu"]["generator"]
        lines.append(f"| {r['row']} | {r['kind']} | {r['seconds_per_step']['step'] * 1000:.0f} | "
                     f"{r['images_per_s']:.2f} | {r['speedup']:.2f}x | {r['peak_memory_mib']:.0f} | "
                     f"{r['mfu']['step']:.1%} / " + (f"{generator:.1%}" if generator is not None else "-") + " |")
    return "\n".join(lines)
