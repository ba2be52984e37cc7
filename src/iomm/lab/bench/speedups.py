"""`iomm bench speedups`: each speed-up of the training step alone on top of the naive faithful step, then all
together, each row `iomm bench train-step` in its own process (so its peak memory is its own): time, images/s,
peak memory, FLOPs and MFU of `Trainer.train_step`.

Every row reads the same images, a folder of world images at the config's resolution, and the cached-latent rows
read its latent cache (`iomm data cache`), both made first in `--work`.
"""

from __future__ import annotations

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


def _iomm(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "iomm.cli", *argv], check=True)


def _sets(overrides: list[str] | tuple[str, ...]) -> list[str]:
    return [f"--set={o}" for o in overrides]


def run(config: str, overrides: list[str], steps: int, warmup: int, repeats: int, images: int, work: Path,
        out: Path) -> dict:
    """Every row's step in its own process, `repeats` rounds (each row keeps its fastest), files in `work`; the
    record `iomm bench speedups --out` holds (its command line, the machine, NAIVE, the rows with their speed-ups)."""
    from iomm.config_checks import load_config
    from iomm.lab.bench.train_step import NAIVE
    from iomm.training.hardware import machine

    cfg = load_config(config, overrides, check_paths=False)
    folder, latents = work / "images", work / "latents"
    data = [*overrides, "data.source=folder", f"data.path={folder}"]
    if not (folder / "metadata.jsonl").is_file():
        _iomm("world", "sample", "--n", str(images), "--resolution", str(cfg.data.resolution),
              "--out", str(folder))
    if not (latents / "cache.json").is_file():
        _iomm("data", "cache", "--config", config, *_sets(data), "--out", str(latents), "--no-progress")
    runs: dict[str, list[dict]] = {row.name: [] for row in rows()}
    for repeat in range(repeats):  # round-robin, so that a drift of the machine's speed hits every row
        for row in rows():
            row_out = work / "rows" / f"{row.name.replace(' ', '_').replace('/', '_')}.{repeat}.json"
            sets = [*data, *NAIVE, *row.overrides, *([f"data.latents={latents}"] if row.cached_latents else [])]
            if not row_out.is_file():
                _iomm("bench", "train-step", "--config", config, *_sets(sets), f"--steps={steps}",
                      f"--warmup={warmup}", f"--out={row_out}")
            runs[row.name].append(json.loads(row_out.read_text(encoding="utf-8"))["run"])
    results = []
    for row in rows():
        best = min(runs[row.name], key=lambda run: run["seconds_per_step"]["step"])
        results.append({"row": row.name, "kind": row.kind, "overrides": list(row.overrides), **best,
                        "step_s_of_each_round": [run["seconds_per_step"]["step"] for run in runs[row.name]],
                        "warmup_s_of_each_round": [run["warmup_s"] for run in runs[row.name]]})
    naive = results[0]["seconds_per_step"]["step"]
    for result in results:
        result["speedup"] = naive / result["seconds_per_step"]["step"]
    command = ["iomm", "bench", "speedups", "--config", config, *_sets(overrides), f"--steps={steps}",
               f"--warmup={warmup}", f"--repeats={repeats}", f"--images={images}",
               f"--work={work}", f"--out={out}"]
    return {"command": shlex.join(command), "machine": machine(), "naive": NAIVE, "rows": results}


def table(record: dict) -> str:
    lines = ["| row | kind | ms / step | images / s | speed-up | peak memory (MiB) | MFU step / generator |",
             "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        generator = r["mfu"]["generator"]
        lines.append(f"| {r['row']} | {r['kind']} | {r['seconds_per_step']['step'] * 1000:.0f} | "
                     f"{r['images_per_s']:.2f} | {r['speedup']:.2f}x | {r['peak_memory_mib']:.0f} | "
                     f"{r['mfu']['step']:.1%} / " + (f"{generator:.1%}" if generator is not None else "-") + " |")
    return "\n".join(lines)
