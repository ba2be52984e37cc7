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
    # exact: the same computation; same math: the same formulas, other kernels and rounding; mixed precision;
    # trade-off: a different computation; memory: memory bought with time
    kind: str = "exact"


BF16 = Row("bf16 where native", ("train.mixed_precision=auto",), kind="mixed precision")
DROP = Row("masking.mode=drop", ("masking.mode=drop",), kind="trade-off")
SINGLE = (Row("prefix KV cache", ("mllm.prefix_cache=true",)), Row("cached latents", cached_latents=True), BF16,
          Row("torch.compile of the generator blocks", ("train.compile=true",), kind="same math"),
          Row("fused AdamW", ("train.fused_optimizer=true",), kind="same math"), DROP)


def rows() -> list[Row]:
    """The naive step, each speed-up alone, then together (every combined row reads the latent cache)."""
    fp32 = tuple(o for row in SINGLE if row.kind in ("exact", "same math") for o in row.overrides)
    every = (*fp32, *BF16.overrides)
    return [Row("naive faithful step"), *SINGLE,
            Row("all but bf16 and drop (fp32)", fp32, True, "same math"),
            Row("all but drop", every, True, "mixed precision"),
            Row("all", (*every, *DROP.overrides), True, "trade-off"),
            Row("all but drop, + activation checkpointing", (*every, "train.activation_checkpointing=true"), True,
                "memory")]


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("speedups", help="each training-step speed-up alone and all together, one process each")
    s.add_argument("--config", required=True)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--repeats", type=int, default=1,
                   help="rounds over all rows; each row keeps its fastest round (a shared machine's speed drifts)")
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
    from iomm.training.bench import NAIVE
    from iomm.training.hardware import machine

    cfg = load_config(args.config, args.overrides, check_paths=False)
    images, latents = args.work / "images", args.work / "latents"
    data = [*args.overrides, "data.source=folder", f"data.path={images}"]
    if not (images / "metadata.jsonl").is_file():
        _iomm("world", "sample", "--n", str(args.images), "--resolution", str(cfg.data.resolution),
              "--out", str(images))
    if not (latents / "cache.json").is_file():
        _iomm("data", "cache", "--config", args.config, *_sets(data), "--out", str(latents), "--no-progress")
    runs: dict[str, list[dict]] = {row.name: [] for row in rows()}
    for repeat in range(args.repeats):  # round-robin, so that a drift of the machine's speed hits every row
        for row in rows():
            out = args.work / "rows" / f"{row.name.replace(' ', '_').replace('/', '_')}.{repeat}.json"
            sets = [*data, *NAIVE, *row.overrides, *([f"data.latents={latents}"] if row.cached_latents else [])]
            if not out.is_file():
                _iomm("bench", "train-step", "--config", args.config, *_sets(sets), f"--steps={args.steps}",
                      f"--warmup={args.warmup}", f"--out={out}")
            runs[row.name].append(json.loads(out.read_text(encoding="utf-8"))["run"])
    results = []
    for row in rows():
        best = min(runs[row.name], key=lambda run: run["seconds_per_step"]["step"])
        results.append({"row": row.name, "kind": row.kind, "overrides": list(row.overrides), **best,
                        "step_s_of_each_round": [run["seconds_per_step"]["step"] for run in runs[row.name]],
                        "warmup_s_of_each_round": [run["warmup_s"] for run in runs[row.name]]})
    naive = results[0]["seconds_per_step"]["step"]
    for result in results:
        result["speedup"] = naive / result["seconds_per_step"]["step"]
    command = ["iomm", "bench", "speedups", "--config", args.config, *_sets(args.overrides), f"--steps={args.steps}",
               f"--warmup={args.warmup}", f"--repeats={args.repeats}", f"--images={args.images}",
               f"--work={args.work}", f"--out={args.out}"]
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
