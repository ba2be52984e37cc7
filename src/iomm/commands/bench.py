"""`iomm bench train-step`: images/s and the time split of a training step, as JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
from pathlib import Path

from iomm.commands.train import add_config_args
from iomm.config import load_config

# The naive faithful step: the paper's algorithm as written, fp32, masked tokens zeroed in place, and
# the whole condition + queries sequence differentiated through the frozen LLM.
NAIVE = ["train.mixed_precision=fp32", "masking.mode=zero", "mllm.prefix_cache=false"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks")
    sub = p.add_subparsers(dest="bench", required=True)
    b = sub.add_parser("train-step", help="time one training step, split by component")
    add_config_args(b)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--compare-naive", action="store_true",
                   help="also time the naive faithful step (fp32, zero masking, no prefix cache) "
                        "and report the speed-up")
    b.add_argument("--out", default="runs/bench/train_step.json",
                   help="result JSON (default: runs/bench/train_step.json, outside the tracked tree)")
    b.set_defaults(func=_train_step)
    w = sub.add_parser("world", help="render speed of the procedural world (images/s, one thread)")
    w.add_argument("--n", type=int, default=5000)
    w.add_argument("--resolution", type=int, default=32)
    w.set_defaults(func=_world)


def _train_step(args: argparse.Namespace) -> int:
    from iomm.training.bench import bench_train_step

    command = ["iomm", "bench", "train-step", *(["--config", args.config] if args.config else []),
               *(f"--set={o}" for o in args.overrides), f"--steps={args.steps}", f"--warmup={args.warmup}",
               *(["--compare-naive"] if args.compare_naive else []), f"--out={args.out}"]
    result = {"command": shlex.join(command), "config": args.config, "overrides": args.overrides, "machine": machine()}
    result["run"] = bench_train_step(load_config(args.config, args.overrides), args.steps, args.warmup)
    _print("this config", result["run"])
    if args.compare_naive:
        result["naive"] = bench_train_step(load_config(args.config, args.overrides + NAIVE), args.steps, args.warmup)
        _print("naive faithful step", result["naive"])
        result["speedup"] = result["run"]["images_per_s"] / result["naive"]["images_per_s"]
        print(f"speed-up over the naive step: {result['speedup']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"wrote {out}")
    return 0


def machine() -> str:
    """CPU model and core count (Linux reports no processor name through `platform`)."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def _print(title: str, run: dict) -> None:
    print(f"{title}: {run['images_per_s']:.1f} images/s ({run['mixed_precision']}, masking {run['masking_mode']}, "
          f"{run['threads']} threads)")
    for name, seconds in run["seconds_per_step"].items():
        print(f"  {name:>22s}  {seconds * 1000:8.1f} ms")
    mfu = run["mfu"]
    print(f"  {run['flops_per_step']['step'] / 1e9:.2f} GFLOP a step; MFU {mfu['step']:.1%} of the "
          f"{run['matmul_peak_flops'] / 1e9:.1f} GFLOP/s matmul peak" + (
              f", generator {mfu['generator']:.1%}" if mfu["generator"] is not None else ""))


def _world(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from iomm.nano.world import World, WorldConfig

    world, rng = World(WorldConfig(resolution=args.resolution)), np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(args.n):
        world.render(world.sample_scene(rng))
    rate = args.n / (time.perf_counter() - start)
    print(f"world: {rate:.0f} images/s sampled and rendered at {args.resolution} px (one process)")
    return 0
